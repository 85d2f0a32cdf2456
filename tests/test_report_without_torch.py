"""A report is built where only the results are: no torch, no Ray.

Reading results and writing a report must work on a laptop that has only the dataset, and
fast; importing torch alone takes seconds. The divergence table once imported torch through
rayq.host.measure, so this builds a whole report in a fresh interpreter and looks at what it imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from pathlib import Path

import rayq.store.query, rayq.report, rayq.store.dataset
from rayq.report import tables

out = Path(sys.argv[1])
store = rayq.store.dataset.Store(str(out))
for precision, tokens in (("bf16", [5, 6, 7, 8]), ("gptq-int4", [5, 6, 9, 8])):
    rows = [
        {"completion_id": f"{precision}-{p}-{s}-{m}", "model": "m", "precision": precision, "prompt_id": p,
         "seed": s, "status": "ok", "protocol": "serial", "max_new_tokens": m, "max_returned_tokens": m,
         "temperature": 1.0, "top_k": 50, "text": "words", "duplicate_content_words": float(p + s + m // 8),
         "content_words": 10.0 + p, "tokens_per_s": 20.0 + s}
        for p in range(3) for s in range(2) for m in (8, 16)
    ]
    store.write("m", precision, rows)
    store.write_model_info("tiny", {"model": "m", "precision": precision, "reference_tokens": tokens,
                                    "reference_text": "text", "footprint_bytes": 1000})
report = rayq.report.build(out, n_boot=20)
assert report.tables["divergence"].rows == [["m", "gptq-int4", "bf16", 2, "text"]], report.tables["divergence"].rows
rayq.report.write(out, n_boot=20)
models = rayq.store.query.open(out).models.collect()
assert tables.divergence_table(models).rows == report.tables["divergence"].rows
print(" ".join(sorted(m for m in ("torch", "ray", "transformers") if m in sys.modules)) or "none")
"""


def test_building_a_report_imports_neither_torch_nor_ray(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "results")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "none"
    assert (tmp_path / "results" / "report.md").is_file()
