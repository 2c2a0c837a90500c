"""Rank helpers under a real 3-process torchrun: local-rank-0-first work and errors that reach every rank."""

import json
import sys
import textwrap

from fmdist import distributed

from helpers import free_port, run_command

PROBE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch.distributed as dist
    from fmdist import distributed
    from fmdist.errors import FmdistError

    dist.init_process_group("gloo")
    folder = Path(sys.argv[1])
    marker = folder / "downloaded"

    def download():
        if distributed.is_local_main_process():
            time.sleep(1.0)  # a slow download: the others must wait for it
            marker.write_text("done")
        return marker.exists()

    def fails_on_local_main():
        if distributed.is_local_main_process():
            raise FmdistError("weights file is corrupt")
        return "ok"

    report = {"saw_file": distributed.local_main_first(download)}
    try:
        distributed.local_main_first(fails_on_local_main)
        report["error"] = None
    except FmdistError as e:
        report["error"] = str(e)
    report["sum"] = distributed.all_reduce_sum([distributed.rank() + 1, 1.5])
    (folder / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    """
)


def test_local_main_first_makes_others_wait_and_shares_its_failure(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run_command(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=3",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(script),
            str(tmp_path),
        ],
        cwd=tmp_path,
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [r["saw_file"] for r in reports] == [True, True, True]
    assert [r["error"] for r in reports] == ["weights file is corrupt"] * 3
    assert all(r["sum"] == [6.0, 4.5] for r in reports)


def test_single_process_defaults(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.all_reduce_sum([2.0, 3.0]) == [2.0, 3.0]
    monkeypatch.setenv("RANK", "2")
    assert not distributed.is_main_process()


def test_precision_fallbacks():
    native = distributed.cpu_has_bf16_units()
    assert distributed.resolve_mixed_precision("auto", "cpu") == ("bf16" if native else "no")
    assert distributed.resolve_mixed_precision("fp16", "cpu") == ("bf16" if native else "no"), "as auto"
    assert distributed.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert distributed.resolve_mixed_precision("no", "cpu") == "no"
