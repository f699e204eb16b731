"""Rank-0 progress output: plain periodic lines off a terminal, a tqdm bar on one, JSONL records always."""
from __future__ import annotations

import json
import logging

from launcher.progress import Progress

RECORD = {"train/loss": 1.5, "train/ce": 1.25, "train/acc": 0.3, "train/lr": 1e-3, "train/grad_norm": 0.5,
          "perf/tokens_per_s": 12345.0}


def test_plain_lines_with_eta_and_jsonl(tmp_path, caplog):
    progress = Progress(tmp_path, total_steps=100, start_step=0, enabled=True, tty=False)
    with caplog.at_level(logging.INFO, logger="launcher"):
        for step in range(1, 5):
            progress.step_time(2.0)
            progress.update(step, RECORD, print_line=step % 2 == 0)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[-1].startswith("step 4/100 | loss 1.5000 ce 1.2500")
    assert "eta 0:03:12" in lines[-1]  # 96 steps left at 2 s each
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[0]["train/ce"] == 1.25


def test_eta_leaves_out_the_first_step():
    """The first step carries compilation (minutes on a GPU); an ETA that weighs it in overstates the rest."""
    progress = Progress(None, total_steps=100, start_step=0, enabled=False)
    progress.step_time(200.0)
    assert progress.eta(1) == 200.0 * 99  # nothing better known yet
    for _ in range(9):
        progress.step_time(0.5)
    progress.step_time(5.5)  # an evaluation: it recurs, so it counts
    assert progress.eta(11) == (9 * 0.5 + 5.5) / 10 * 89


def test_tty_bar_and_disabled_ranks(tmp_path, capsys):
    progress = Progress(tmp_path, total_steps=10, start_step=5, enabled=True, tty=True)
    progress.step_time(1.0)
    progress.update(6, RECORD, print_line=True)
    progress.close()
    err = capsys.readouterr().err
    assert "6/10" in err and "loss=1.5000" in err
    other = tmp_path / "rank1"
    other.mkdir()
    Progress(other, total_steps=10, start_step=0, enabled=False).update(1, RECORD, print_line=True)
    assert not (other / "train_log.jsonl").exists()
