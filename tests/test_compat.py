"""The torch-release bridges of src/aikd/compat.py, on the installed torch and on the keywords of others.

The gloo test starts two real processes with torchrun. On torch 2.11 the wrap it exercises raised
``TypeError: ... unexpected keyword argument 'forward_sync_buffers'`` before compat.py existed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aikd.compat import ddp_buffer_kwargs, ddp_parameters
from aikd.errors import AikdError

# DistributedDataParallel.__init__'s keywords, as torch 2.11.0 and 2.14.1 define them.
DDP_2_11 = ("module", "device_ids", "output_device", "dim", "broadcast_buffers", "init_sync", "process_group",
            "bucket_cap_mb", "find_unused_parameters", "check_reduction", "gradient_as_bucket_view", "static_graph",
            "delay_all_reduce_named_params", "param_to_hook_all_reduce", "mixed_precision", "device_mesh",
            "skip_all_reduce_unused_params", "bucket_cap_mb_list")
DDP_2_14 = (*DDP_2_11, "batched_grad_copy", "forward_sync_buffers")


def test_the_buffer_keyword_is_one_the_installed_ddp_accepts():
    kwargs = ddp_buffer_kwargs(ddp_parameters())
    assert set(kwargs) <= ddp_parameters()
    assert list(kwargs.values()) == [False]


@pytest.mark.parametrize(("accepted", "keyword"), [(DDP_2_11, "broadcast_buffers"),
                                                     (DDP_2_14, "forward_sync_buffers")])
def test_each_release_gets_its_own_buffer_keyword(accepted, keyword):
    """Newer releases deprecate broadcast_buffers (a FutureWarning each run): used only where it is all there is."""
    assert ddp_buffer_kwargs(accepted) == {keyword: False}


def test_a_ddp_without_either_keyword_is_refused_by_name():
    with pytest.raises(AikdError, match="neither forward_sync_buffers nor broadcast_buffers"):
        ddp_buffer_kwargs(("module", "device_ids"))


RANK_SCRIPT = textwrap.dedent("""
    import torch
    import torch.distributed as dist
    from torch import nn

    from aikd.distributed import DataParallel, setup

    info = setup("cpu")
    torch.manual_seed(info.rank)  # each rank builds different weights
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(info.rank + 1.0)
    wrapped = DataParallel(info).wrap(model, torch.device("cpu"))

    def everyone(tensor):
        parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return parts

    # Construction: every rank holds rank 0's weights and buffers.
    for name, tensor in model.state_dict().items():
        first, second = everyone(tensor.float())
        assert torch.equal(first, second), f"{name} differs between the ranks after wrap"
    assert float(model[1].running_mean[0]) == 1.0

    # A forward does not broadcast buffers: rank 1's own statistics survive it.
    model[1].running_mean.fill_(info.rank + 1.0)
    wrapped.eval()
    wrapped(torch.ones(2, 3))
    assert float(model[1].running_mean[0]) == info.rank + 1.0, "a forward overwrote this rank's buffers"

    # Backward averages the gradients.
    wrapped.train()
    wrapped(torch.full((4, 3), float(info.rank))).square().sum().backward()
    first, second = everyone(model[0].weight.grad)
    assert torch.equal(first, second), "gradients were not averaged"
    dist.barrier()  # neither rank tears gloo down while the other still sends (an abort at exit otherwise)
    dist.destroy_process_group()
    print(f"rank {info.rank} ok")
""")


def test_two_gloo_ranks_wrap_start_from_rank_zero_and_keep_their_own_buffers(tmp_path: Path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    # The two ranks share one stdout, so their lines may run together: count the marks, not the lines.
    assert sorted(re.findall(r"rank (\d) ok", done.stdout)) == ["0", "1"], done.stdout
