"""Data pipeline: sources -> tokenizer -> indexed memory-mapped dataset -> packed batches.

    from bbm.data import DataConfig, prepare, PackedLoader
    loader = PackedLoader(prepare(DataConfig()), seq_len=8192, batch_size=1, rank=r, world_size=w, seed=0)
"""
from bbm._lazy import lazy_exports

__all__ = ["DataConfig", "IGNORE_INDEX", "prepare", "PackedLoader", "TokenDataset", "ByteTokenizer", "HFTokenizer",
           "load_tokenizer", "write_dataset"]
lazy_exports(__name__, {"prepare": "bbm.data.build", "DataConfig": "bbm.data.config",
                        "TokenDataset": "bbm.data.dataset", "write_dataset": "bbm.data.dataset",
                        "PackedLoader": "bbm.data.loader", "IGNORE_INDEX": "bbm.data.packing",
                        "ByteTokenizer": "bbm.data.tokenizer", "HFTokenizer": "bbm.data.tokenizer",
                        "load_tokenizer": "bbm.data.tokenizer"})
