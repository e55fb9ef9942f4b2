"""scripts/bench_data.py end to end on a tiny run: it makes its three JPEG sets and times every cell."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_data_json(tmp_path):
    out = subprocess.run([sys.executable, "scripts/bench_data.py", "--make", "4", "--seconds", "0.3",
                          "--batch", "4", "--resolution", "64", "--workers", "1", "--gpu-img-per-s", "64=100",
                          "--json",
                          "--dir", str(tmp_path)],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    sets = {s["set"]: s for s in result["images"]}
    assert set(sets) == {"1mp", "2mp", "pre-resized 64"} and all(s["count"] == 4 for s in sets.values())
    assert 1.0 <= sets["1mp"]["min_mp"] and sets["1mp"]["max_mp"] <= 1.35 and sets["2mp"]["min_mp"] >= 2.0
    assert (len(list((tmp_path / "pre64").glob("*.jpg"))) == 4
            and (tmp_path / "pre64" / "metadata.jsonl").is_file())
    cells = {(c["images"], c["path"], c["workers"]) for c in result["cells"]}
    assert cells == {("1mp", "per_core", 0), ("2mp", "per_core", 0), ("pre-resized", "per_core", 0),
                     ("1mp", "per_core_no_draft", 0), ("1mp", "loader", 1), ("pre-resized", "loader", 1)}
    assert all(c["resolution"] == 64 and c["samples"] > 0 and c["samples_per_s"] > 0 for c in result["cells"])
    assert all(value > 20 for value in result["psnr_db"]["64"].values())  # dB: a sane image, not a timing
    per_core = {c["images"]: c["per_core"] for c in result["cells"] if c["path"] == "per_core"}
    estimate = result["cores_per_gpu"]["64"]["by_images"]
    assert estimate == {name: round(100 / per_core[name], 1) for name in ("1mp", "pre-resized")}
    assert set(result["machine"]) >= {"cpu", "cores", "torch", "pillow", "libjpeg_turbo"}
