"""The process group of a data-parallel run, and the per-step gradient exchange that train_scales calls.

One process (no torchrun) is a group of one: nothing is exchanged and nothing else changes. Under torchrun
(WORLD_SIZE > 1) torch.distributed is started from its environment: NCCL when the process has a GPU, gloo
otherwise.

Every collective of a run is preceded by a *status exchange*: a fixed-size all_gather in which each rank
says whether it failed (with its error) and which experts it used this step. A rank that fails anywhere
takes part in exactly one more status exchange, with its error, which is the one the others are waiting in
(or will reach next), so they stop with that rank's error instead of waiting in a collective it never
joins. Everyone then meets in one last exchange (`finish`) before exiting, so that rank 0 has written the
partial scales before torchrun reaps the process group.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tuneqdm_core.errors import CollectiveError, PeerFailedError, SettingError

STATUS_BYTES = 512
MAX_EXPERTS = 64  # status bytes 1..64 flag the experts a rank used; the rest carry its text
_TEXT = 1 + MAX_EXPERTS


@dataclass
class Traffic:
    """What the collectives of this process carried: payload (the bytes of the tensors it contributed) and,
    on Linux, the bytes it wrote to its sockets meanwhile (/proc/self/io wchar: gloo's actual traffic)."""

    payload: int = 0
    written: int | None = 0
    collectives: int = 0
    steps: list[dict] = field(default_factory=list)  # one record per synced step


def _wchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


@dataclass(frozen=True)
class Status:
    rank: int
    failed: bool
    experts: frozenset[int]
    text: str


class Group:
    """This process's place in the run: rank, world size, device, and the collectives it takes part in."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 backend: str | None = None) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device or torch.device("cpu")
        self.backend = backend
        self.traffic = Traffic()
        self.failure: CollectiveError | None = None  # the error a stop_exceptions-ended run must re-raise

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # ---- collectives ------------------------------------------------------------------------------

    def _counted(self, payload: int, op) -> None:
        before = _wchar()
        op()
        after = _wchar()
        self.traffic.payload += payload
        self.traffic.collectives += 1
        if self.traffic.written is not None:
            self.traffic.written = None if before is None or after is None else self.traffic.written + after - before

    def exchange(self, failed: bool = False, text: str = "", experts: set[int] | frozenset[int] = frozenset()) -> list[Status]:
        """Every rank's status, in rank order (see the module docstring)."""
        mine = Status(self.rank, failed, frozenset(experts), text)
        if not self.distributed:
            return [mine]
        buf = torch.zeros(STATUS_BYTES, dtype=torch.uint8)
        buf[0] = 1 if failed else 0
        for e in experts:
            if not 0 <= e < MAX_EXPERTS:
                raise SettingError(f"expert {e} outside the {MAX_EXPERTS} a status can carry")
            buf[1 + e] = 1
        raw = text.encode()[: STATUS_BYTES - _TEXT]
        buf[_TEXT:_TEXT + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        buf = buf.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        self._counted(buf.nbytes, lambda: dist.all_gather(out, buf))
        statuses = []
        for r, b in enumerate(out):
            b = b.cpu()
            flags = b[1:_TEXT].nonzero().flatten().tolist()
            text_r = bytes(b[_TEXT:].tolist()).rstrip(b"\0").decode(errors="replace")
            statuses.append(Status(r, bool(b[0]), frozenset(flags), text_r))
        return statuses

    def check(self, experts: set[int] = frozenset(), what: str = "") -> list[Status]:
        """A status exchange; raises PeerFailedError (kept in `failure`) when some rank reported a failure."""
        statuses = self.exchange(False, what, experts)
        failed = [s for s in statuses if s.failed]
        if failed:
            self.failure = PeerFailedError("; ".join(f"rank {s.rank} failed: {s.text}" for s in failed))
            raise self.failure
        return statuses

    def agree(self, what: str, identity: str) -> None:
        """Check that every rank has the same `identity` (model, data, run settings); the error names the ranks
        that differ from rank 0. Raised on every rank alike."""
        statuses = self.check(what=identity)
        differ = [s for s in statuses if s.text != statuses[0].text]
        if differ:
            self.failure = CollectiveError(
                f"ranks disagree on {what}: rank 0 has {statuses[0].text!r}, "
                + ", ".join(f"rank {s.rank} has {s.text!r}" for s in differ))
            raise self.failure

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        if self.distributed:
            self._counted(tensor.nbytes, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))

    def fail(self, message: str) -> None:
        """This rank failed: tell the others (the status exchange they are in or will reach next), then meet
        them once more. Never raises: the group may itself be what broke."""
        if not self.distributed:
            return
        try:
            self.exchange(True, message)
            self.finish()
        except Exception:  # a broken group: torchrun's agent stops the other ranks
            pass

    def finish(self) -> None:
        """The last exchange of a failed run: every rank has done its cleanup (rank 0 its partial file)."""
        if self.distributed:
            try:
                self.exchange(False, "finish")
            except Exception:
                pass

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def start(timeout_s: float = 600.0) -> Group:
    """The group this process belongs to, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); a group of one without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SettingError(f"rank {rank}: local rank {local_rank} but only {torch.cuda.device_count()} GPUs here; "
                               "start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank)  # before ComfyUI is imported: it takes the current device as its own
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


class GradientAllReduce:
    """train_scales' `sync`: sums every rank's gradients and divides by the world size, so each rank holds the
    gradient of the whole step's mean loss (each rank's loss is already its own batch's mean), and updates
    the experts that any rank used. Only the rows of those experts travel: an expert no sample used has a
    zero gradient row on every rank. Every rank then clips and steps identically.

    Also keeps, per step, the experts updated, the loss and the bytes exchanged (`group.traffic.steps`), and
    the live trainable tensors (`params`) for periodic saves."""

    def __init__(self, group: Group, num_experts: int) -> None:
        if num_experts > MAX_EXPERTS:
            raise SettingError(f"{num_experts} experts: a data-parallel run handles at most {MAX_EXPERTS}")
        self.group, self.num_experts = group, num_experts
        self.params: list[torch.Tensor] = []

    def __call__(self, params: list[torch.Tensor], used: set[int], loss: float) -> tuple[set[int], float]:
        self.params = params
        g = self.group
        payload, written = g.traffic.payload, g.traffic.written
        statuses = g.check(set(used))
        union = sorted(set().union(*(s.experts for s in statuses)))
        if g.distributed and union:
            rows = torch.tensor(union, device=params[0].device)
            parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).index_select(0, rows).reshape(-1).float()
                     for p in params]
            has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=rows.device)
            flat = torch.cat(parts + [has, torch.tensor([loss], dtype=torch.float32, device=rows.device)])
            # NCCL reduces only GPU tensors; the scales may sit elsewhere (the trainer keeps them where they start).
            reduced = flat.to(g.device)
            g.all_reduce_sum_(reduced)
            flat = reduced.to(rows.device) / g.world
            offset = 0
            for p, part in zip(params, parts):
                n = part.numel()
                grad = torch.zeros_like(p)
                grad.index_copy_(0, rows, flat[offset:offset + n].view(len(union), *p.shape[1:]).to(p.dtype))
                p.grad = grad
                offset += n
            for p, h in zip(params, flat[offset:offset + len(params)].tolist()):
                if h == 0:
                    p.grad = None  # no rank had a gradient for it: the optimizer skips it, as in one process
            loss = float(flat[-1])
        g.traffic.steps.append(dict(experts=union, loss=loss, payload=g.traffic.payload - payload,
                                    written=None if written is None or g.traffic.written is None
                                    else g.traffic.written - written))
        return set(union), loss
