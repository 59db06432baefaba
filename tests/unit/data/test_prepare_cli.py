"""data/prepare.py: the configs its usage (and the other entry points' docs) name exist; a preset name works."""
import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCS = ["data/prepare.py", "train.py", "README.md", "docs/training.md", *map(str, (REPO / "launch").glob("*"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: Path(p).name)
def test_named_configs_exist(doc):
    path = REPO / doc
    if not path.is_file():
        pytest.skip(f"{doc} is not in this checkout")
    for name in set(re.findall(r"configs/[a-z0-9_]+\.yaml", path.read_text())):
        assert (REPO / name).is_file(), f"{doc} names {name}, which does not exist"


def test_prepare_takes_a_preset_name(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "data" / "prepare.py"))["main"]
    main(["--config", "tiny_cpu", "--max-documents", "3", "--num-workers", "1", "--cache-dir", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert out.startswith(str(tmp_path)) and '"max_documents": 3' in out
    with pytest.raises(SystemExit, match=r"^config error: --config: expected an existing YAML file or a preset name"):
        main(["--config", "tiny", "--quiet"])
