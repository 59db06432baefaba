"""Data pipeline: sources -> tokenizer -> indexed memory-mapped dataset -> packed batches.

    from bbm.data import DataConfig, prepare, PackedLoader
    loader = PackedLoader(prepare(DataConfig()), seq_len=8192, batch_size=1, rank=r, world_size=w, seed=0)
"""
from bbm.data.build import prepare
from bbm.data.config import DataConfig
from bbm.data.dataset import TokenDataset, write_dataset
from bbm.data.loader import PackedLoader
from bbm.data.packing import IGNORE_INDEX
from bbm.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["DataConfig", "IGNORE_INDEX", "prepare", "PackedLoader", "TokenDataset", "ByteTokenizer", "HFTokenizer",
           "load_tokenizer", "write_dataset"]
