"""Asynchronous rollouts (`stage.ppo.async_rollouts: k`, k >= 1): a rollout worker, a separate process
with one thread (the trainer gives one up), samples update u+1's responses while the trainer trains on
update u's.

What practitioners run (verl's one-step-off-policy trainer, OpenRLHF's async mode, AReaL), in our own
form for one host:

- **Weights.** The worker holds its own copy of the policy. The trainer writes the trained weights into
  a shared-memory buffer after each update (`publish`), and the worker copies them in before it samples.
- **Staleness.** Update u's rollouts are sampled with the weights of exactly `max(start, u - k)` updates:
  at most k old. The version each batch used is fixed, not a race. The trainer does not publish version v
  until the worker has copied in version v-1 for every batch that needs it. So a run samples the same
  tokens however fast each process is.
- **Correction.** The behaviour policy (the worker's weights) and the policy that starts the update (the
  trainer's, `old_logp`) differ once staleness is above 0. The loss weighs each token by the truncated
  importance weight `min(pi_old / pi_behaviour, tis_cap)` (TIS, Yao et al. 2025; AReaL's decoupled
  PPO), `stages/rl/ppo_math.py: policy_loss`. Where staleness is 0 the two policies are one and the
  weight is exactly 1.
- **Randomness.** Each update's rollouts draw from their own seed (`rollout_seed`), in the worker and
  in the synchronous loop alike. The worker with k = 0 therefore samples what the synchronous loop
  samples, token for token.
- **Resume.** A checkpoint at update s holds the batches s..s+k-1 already sampled with older weights
  (`pending`). A resumed run trains on those, so it ends where the uninterrupted run ends.

Refused with dynamic sampling, vLLM, ZeRO-3, a process group and the shared-base layout (the trained
policy here is one model the worker can copy). The worker dies with the trainer: it watches its parent.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import time
from dataclasses import dataclass

import torch

from stages.models.compute import autocast
from stages.models.modeling import Rollout, response_logprobs

_ROLLOUT_TENSORS = ("query", "query_mask", "response", "response_mask", "finished")  # a blob's, in order
_POLL_S = 0.002  # how often a waiting side looks again
_LONGEST_WAIT_S = 600.0  # the longest the trainer waits for one batch before calling the worker stuck


def rollout_seed(seed: int, rank: int, update: int) -> int:
    """The seed update `update`'s rollouts draw from on rank `rank`: the same wherever they are sampled."""
    return (seed * 1_000_003 + rank * 10_007 + update * 7_919 + 17) % (2**63 - 1)


@contextlib.contextmanager
def generation_rng(seed: int):
    """Inside: the global RNG seeded with `seed`. After: the RNG as it was, so sampling takes nothing from
    the trainer's stream (its minibatch order and dropout do not depend on how many tokens were drawn)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class Behaviour:
    """One update's rollouts from the worker: the tokens, their log-probs under the weights that sampled
    them (`logp`, response-shaped) and those weights' `version` (updates done) and publication time."""

    update: int
    rollout: Rollout
    logp: torch.Tensor
    version: int
    published_at: float
    waited_s: float = 0.0

    def staleness(self) -> int:
        return self.update - self.version

    def to_blob(self) -> dict:
        """As plain tensors and numbers (what `torch.load(weights_only=True)` reads back)."""
        tensors = {k: getattr(self.rollout, k).cpu() for k in _ROLLOUT_TENSORS}
        return {"update": self.update, "version": self.version, "logp": self.logp.cpu(), **tensors}

    @classmethod
    def from_blob(cls, blob: dict) -> Behaviour:
        rollout = Rollout(*(blob[k] for k in _ROLLOUT_TENSORS))
        return cls(blob["update"], rollout, blob["logp"], blob["version"], published_at=time.time())


class RolloutWorker:
    """The trainer's side: starts the worker process (`attach` gives it the trained policy), asks it for
    batches ahead of time, hands the trained weights over after each update and takes the batches in
    update order. `lag`: the most updates a batch's weights may be behind (k); `prompts_for(u)`: update
    u's prompts."""

    def __init__(self, cfg, tuning, policy_dir, budget, prompts_for, *, lag: int, rank: int = 0) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.k, self.updates, self.prompts_for = lag, cfg.updates, prompts_for
        self.version = ctx.Value("q", 0)
        self.published_at = ctx.Value("d", time.time())
        self.copied_for = ctx.Value("q", -1)  # the last update whose weights the worker has copied in
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        self.ready: dict[int, Behaviour] = {}
        # with lag 0 the two never run at once and each takes every thread; else the worker takes one
        self.threads = torch.get_num_threads()
        worker_threads = self.threads if lag == 0 else 1
        job = WorkerJob(str(policy_dir), tuning, _sampling(cfg, budget), cfg.seed, rank, os.getpid(), worker_threads)
        shared = (self.version, self.published_at, self.copied_for)
        self.process = ctx.Process(target=worker_main, args=(job, shared, self.requests, self.results), daemon=True)
        if lag:
            torch.set_num_threads(max(1, self.threads - 1))
        with _main_module_hidden():
            self.process.start()  # it loads its copy of the policy while the trainer loads its models

    def attach(self, trained_policy, *, start: int, pending: dict[int, Behaviour] | None = None) -> None:
        """The trained policy (its weights, `start` updates done, go to shared memory and to the worker)
        and the first batches asked for; `pending`: batches a checkpoint kept."""
        trained = {n: p for n, p in trained_policy.named_parameters() if p.requires_grad}
        self.shared = {n: p.detach().to("cpu", copy=True).share_memory_() for n, p in trained.items()}
        self.copies = [(self.shared[n], p) for n, p in trained.items()]  # (buffer, trained parameter)
        self.version.value, self.published_at.value = start, time.time()
        self.requests.put(self.shared)  # shared memory: the worker sees every later `publish` in place
        self.ready = dict(pending or {})
        self.submitted = max(self.ready, default=start - 1)
        self._submit_through(start + self.k)

    def _submit_through(self, last: int) -> None:
        for update in range(self.submitted + 1, min(last, self.updates - 1) + 1):
            self.requests.put((update, self.prompts_for(update), max(self.version.value, update - self.k)))
            self.submitted = update

    def take(self, update: int) -> Behaviour:
        """Update `update`'s batch, waiting for the worker where it is not ready yet."""
        began = time.monotonic()
        while update not in self.ready:
            self._receive(began)
        behaviour = self.ready.pop(update)
        behaviour.waited_s = time.monotonic() - began
        return behaviour

    def _receive(self, began: float) -> None:
        try:
            message = self.results.get(timeout=0.5)
        except queue.Empty:
            if not self.process.is_alive():
                self._raise_dead()
            if time.monotonic() - began > _LONGEST_WAIT_S:
                raise RuntimeError(f"ppo: no rollouts from the worker in {_LONGEST_WAIT_S:.0f} s") from None
            return
        self._keep(message)

    def _keep(self, message) -> None:
        """A batch into `ready`; the worker's error raised here, with its traceback."""
        if message[0] == "error":
            raise RuntimeError(f"ppo: the rollout worker failed:\n{message[1]}")
        _, blob, published_at = message
        behaviour = Behaviour.from_blob(blob)
        behaviour.published_at = published_at
        self.ready[behaviour.update] = behaviour

    def _raise_dead(self) -> None:
        """The worker has exited: its error if it sent one (batches it sent first are kept), else its exit."""
        while True:
            try:
                self._keep(self.results.get(timeout=0.1))
            except queue.Empty:
                raise RuntimeError(f"ppo: the rollout worker died (exit code {self.process.exitcode})") from None

    def publish(self, done: int) -> None:
        """After update `done - 1`: the trained weights become version `done`, once the worker has copied
        in the old version for every batch that samples with it; then the batch `done + k` is asked for."""
        needs_old = min(done - 1 + self.k, self.submitted)
        while self.copied_for.value < needs_old:
            if not self.process.is_alive():
                self._raise_dead()
            time.sleep(_POLL_S)
        with torch.no_grad():
            for buffer, param in self.copies:
                buffer.copy_(param.detach())
        self.published_at.value = time.time()
        self.version.value = done
        self._submit_through(done + self.k)

    def pending(self, done: int) -> dict[int, Behaviour]:
        """For a checkpoint after `done` updates: the batches already asked for with older weights, waited
        for; a resumed run trains on these rather than sampling them again with newer weights."""
        for update in range(done, min(done + self.k, self.updates)):
            while update not in self.ready:
                self._receive(time.monotonic())
        return {u: b for u, b in self.ready.items() if b.version < done}

    def close(self) -> None:
        """Stops the worker (it holds nothing to keep) and gives the trainer its thread back."""
        with contextlib.suppress(Exception):
            self.requests.put(None)
        self.process.join(timeout=0.5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        torch.set_num_threads(self.threads)


@contextlib.contextmanager
def _main_module_hidden():
    """Inside: the `__main__` module without its name and file, so a spawned child does not import it
    again (a flow's main module imports Prefect, Hydra and MLflow: seconds the worker has no use for).
    The worker's target is a function of this module, which the child imports by name."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)


@dataclass
class WorkerJob:
    """What the worker process needs to build its copy of the policy and sample as the trainer would."""

    policy_dir: str
    tuning: object
    sampling: dict
    seed: int
    rank: int
    parent: int
    threads: int


def _sampling(cfg, budget) -> dict:
    return {"max_new_tokens": budget.max_new_tokens, "max_prompt_length": budget.max_prompt_length,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "batch_size": cfg.generation_batch_size,
            "static_cache": cfg.static_cache}  # fmt: skip


def worker_main(job: WorkerJob, shared, requests, results) -> None:
    """The worker process (`job.threads` threads): for each request, the weights of the version it needs copied in,
    then the batch sampled from the update's own seed and its behaviour log-probs computed."""
    import traceback

    torch.set_num_threads(job.threads)
    try:
        sampler = _WorkerPolicy(job)
        weights = _next_request(requests, job.parent)
        while weights is not None and (request := _next_request(requests, job.parent)) is not None:
            results.put(("batch", *sampler.answer(request, weights, shared)))
    except Exception:  # noqa: BLE001 - the trainer raises it with the worker's traceback
        results.put(("error", traceback.format_exc()))


def _next_request(requests, parent: int):
    while True:
        try:
            return requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the trainer is gone (killed): so is its worker
                return None


class _WorkerPolicy:
    def __init__(self, job: WorkerJob) -> None:
        from stages.models.modeling import load_tokenizer
        from stages.models.tuning import load
        from stages.rl.rollout import HfRollout

        self.job = job
        self.tokenizer = load_tokenizer(job.policy_dir)
        self.model = load(job.policy_dir, job.tuning, "causal_lm").eval()
        sampling = dict(job.sampling)
        engine = {"batch_size": sampling.pop("batch_size"), "static_cache": sampling.pop("static_cache")}
        self.engine = HfRollout(self.model, **engine, precision=job.tuning.compute.precision)
        self.sampling = sampling
        self.params = dict(self.model.named_parameters())

    def answer(self, request, weights: dict, shared) -> tuple[dict, float]:
        """(the batch as a blob, when its weights were published) for `(update, prompts, version)`."""
        update, prompts, version = request
        current, published_at, copied_for = shared
        while current.value < version:
            if os.getppid() != self.job.parent:
                raise SystemExit(0)  # the trainer is gone
            time.sleep(_POLL_S)
        if current.value != version:
            raise RuntimeError(f"update {update} needs weights {version}, found {current.value}")
        with torch.no_grad():
            for name, tensor in weights.items():
                self.params[name].copy_(tensor)
        published = published_at.value
        copied_for.value = update
        with generation_rng(rollout_seed(self.job.seed, self.job.rank, update)):
            rollout = self.engine.sample(self.tokenizer, prompts, **self.sampling)
        if rollout.vision is not None:
            raise ValueError("stage.ppo.async_rollouts: prompts with images sample in the trainer; set it to 0")
        with torch.no_grad(), autocast(self.job.tuning.compute):
            logp = response_logprobs(self.model, rollout, temperature=self.sampling["temperature"])[0].float()
        return Behaviour(update, rollout, logp, version, published).to_blob(), published
