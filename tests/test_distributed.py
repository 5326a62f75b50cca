"""Distributed runs end: the torchrun helper turns a hung rank into a failure with each rank's stack, and (with
--stress) the torchrun SFT and PPO runs are repeated to catch an exit that hangs once in a while."""

import textwrap

import pytest
import test_contract
import test_train
from conftest import ROOT, run_torchrun


def test_a_hung_rank_fails_in_bounded_time_with_its_stack(tmp_path):
    script = tmp_path / "hung_rank.py"
    script.write_text(textwrap.dedent("""
        import time
        import torch.distributed as dist

        dist.init_process_group("gloo")
        print(f"rank {dist.get_rank()} joined", flush=True)

        def stuck_before_the_barrier():
            time.sleep(3600)

        if dist.get_rank() == 1:
            stuck_before_the_barrier()
        dist.barrier()
    """))
    with pytest.raises(pytest.fail.Exception) as failure:
        run_torchrun(script, module=None, timeout=12)
    text = str(failure.value)
    assert "did not end in 12 s" in text
    assert "rank 1 joined" in text  # the run's own last lines
    assert "stuck_before_the_barrier" in text  # the hung rank's Python stack, printed by faulthandler on SIGABRT


def test_ddp_wrappers_are_made_in_one_place():
    """Every DDP wrapper comes from distributed.replicate, which shutdown_distributed can account for."""
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "evalkit").rglob("*.py") if "DistributedDataParallel" in p.read_text())
    assert users == ["evalkit/distributed.py"]


@pytest.mark.stress
@pytest.mark.parametrize("attempt", range(10))
def test_torchrun_sft_always_exits(attempt, tmp_path, pretrained):
    test_train.test_sft_under_torchrun_keeps_replicas_identical(tmp_path, pretrained)


@pytest.mark.stress
@pytest.mark.parametrize("attempt", range(10))
def test_torchrun_ppo_always_exits(attempt, tmp_path, sft_dir, concise_rm_dir):
    test_contract.test_ppo_under_torchrun_keeps_replicas_identical(tmp_path, sft_dir, concise_rm_dir)


def test_the_group_is_not_left_while_a_ddp_wrapper_lives():
    """shutdown_distributed refuses to destroy the group under a live DDP wrapper (its reducer would free the group
    later, with the GIL held: the exit deadlock); once the wrapper is released it leaves cleanly."""
    import torch
    import torch.distributed as dist

    from evalkit.distributed import Dist, replicate, shutdown_distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        d = Dist(rank=0, world=2)  # enabled: the code paths of a multi-rank run, on a one-rank group
        wrapper = replicate(torch.nn.Linear(4, 4), d)
        wrapper(torch.randn(2, 4)).sum().backward()
        with pytest.raises(RuntimeError, match="1 DDP wrapper"):
            shutdown_distributed(d)
        assert dist.is_initialized()
        del wrapper
        shutdown_distributed(d)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
