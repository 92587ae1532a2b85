"""One rank of a data-parallel run. torch.distributed.run starts N of these (runners/ddp.py builds the command).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Each rank joins the process group
(nccl on CUDA, gloo on the CPU) with a timeout, so a lost rank ends the others instead of hanging them; takes
the run spec from rank 0 (a follower node may not have written it); loads the data cache itself; and trains its
shard of every global batch inside DDP via runners.train.train_run. Only rank 0 writes files. Rank 0 prints one
`@ablate-epoch {json}` line per epoch, which the launcher relays as progress. Exit code: 0 finished or diverged,
1 failed, 2 a user error (e.g. no data cache on this node)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ablations.errors import UserError
from runners.train import CHECKPOINT_SECONDS

EPOCH_TAG = "@ablate-epoch "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True, help="The run's folder in the results store.")
    p.add_argument("--run-id", required=True, help="The run id the launcher expects (checked on rank 0).")
    p.add_argument("--data-dir", type=Path, default=None, help="Data cache folder (default: $ABLATE_DATA, ...).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of this process.")
    p.add_argument("--timeout-s", type=float, default=120.0, help="Process-group timeout: a lost rank ends the "
                                                                  "others after this long at most.")
    p.add_argument("--context", default="{}", help="JSON merged into the summary's environment.")
    p.add_argument("--checkpoint-seconds", type=float, default=CHECKPOINT_SECONDS,
                   help="Seconds of training between checkpoints (0: after every epoch).")
    return p.parse_args(argv)


def broadcast_text(text: str, device: torch.device) -> str:
    """Rank 0's text on every rank, sent as bytes in a tensor (nothing is unpickled)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, src=0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).decode()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather(obj: dict) -> list[dict]:
    """One (small, tensor-holding) object per rank, in rank order, on every rank. Pickled between our own ranks
    only; the checkpoint that stores the result is still loaded weights-only."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, args.threads))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    try:
        return _train(args, rank, local_rank, world, device, backend)
    except UserError as err:  # e.g. no data cache on this node, a full disk: one line, no traceback
        print(f"error: rank {rank} on {os.uname().nodename}: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group (a lost rank) may refuse to close; we exit anyway
            pass


def _train(args: argparse.Namespace, rank: int, local_rank: int, world: int, device: torch.device,
           backend: str) -> int:
    from ablations.spec import RunSpec
    from runners.data import load_dataset
    from runners.store import RunFolder
    from runners.train import train_run

    text = RunFolder(args.run_dir).read_spec_text() if rank == 0 else ""
    spec = RunSpec.from_json(json.loads(broadcast_text(text, device)))
    if spec.run_id != args.run_id:
        print(f"error: rank {rank} expected run {args.run_id} but rank 0 trains {spec.run_id}; every node must "
              f"run the same grid command", file=sys.stderr, flush=True)
        return 2
    data = load_dataset(spec.dataset, args.data_dir)
    nnodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    context = {**json.loads(args.context), "world_size": world, "backend": backend, "nnodes": nnodes}

    def on_epoch(row: dict) -> None:
        print(EPOCH_TAG + json.dumps(row), flush=True)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    result = train_run(spec, data, args.run_dir, device, context=context, on_epoch=on_epoch if rank == 0 else None,
                       shard=(rank, world), wrap=wrap, reduce=all_reduce_sum, gather=all_gather,
                       checkpoint_seconds=args.checkpoint_seconds)
    return 1 if result.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
