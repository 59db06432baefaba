"""Session fixtures of the data tests: a small corpus, a tiny trained tokenizer, a prepared dataset."""
import pytest

from bbm.data import DataConfig, prepare

from helpers.data import random_texts, train_tokenizer, write_text_dir


@pytest.fixture(scope="session")
def texts():
    return random_texts(0, 60)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory, texts):
    return write_text_dir(tmp_path_factory.mktemp("corpus"), texts)


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory, texts):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", texts)


@pytest.fixture(scope="session")
def byte_dataset(tmp_path_factory, text_dir):
    """The 60 random texts, byte tokenizer."""
    cfg = DataConfig(source="text_dir", path=str(text_dir), cache_dir=str(tmp_path_factory.mktemp("cache")),
                     num_workers=1)
    return prepare(cfg, progress=False)
