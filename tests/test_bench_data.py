"""scripts/bench_data.py end to end on a tiny run: it makes >= 1 MP JPEGs and times every cell."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_data_json(tmp_path):
    out = subprocess.run([sys.executable, "scripts/bench_data.py", "--make", "6", "--seconds", "0.5",
                          "--resolution", "64", "--workers", "1", "--json", "--dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["images"]["count"] == 6 and result["images"]["min_mp"] >= 1.0
    assert len(list(tmp_path.glob("*.jpg"))) == 6 and (tmp_path / "metadata.jsonl").is_file()
    cells = {(c["path"], c["workers"]) for c in result["cells"]}
    assert cells == {("per_core", 0), ("per_core_no_draft", 0), ("loader", 1)}
    assert all(c["resolution"] == 64 and c["samples"] > 0 and c["samples_per_s"] > 0 for c in result["cells"])
    assert set(result["machine"]) >= {"cpu", "cores", "torch", "pillow", "libjpeg_turbo"}
