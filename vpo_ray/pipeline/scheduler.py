"""Continuous batching over a static KV cache: which row decodes in which slot, and when.

Rows wait in a queue, shortest prompt first (neighbours in a prefill batch have similar
lengths, so little padding). Free slots are filled by prefill batches of at most
`prefill_tokens` tokens; then the decode step runs `sync_every` times (CUDA-graph replays)
with attention over the cache up to the next `kv_bucket` multiple past the longest live
row. At each host check the scheduler reads which rows ended (EOS or limit: the step marks
them itself), scans live rows' newest tokens for stop strings and ends those, and hands
finished rows back. With `continuous`, queued rows take free slots at every host check
(`refill_every_check`), or once `refill_min_free` slots are free; without it the batch runs
in waves (all slots drain before the next fill), which is what a plain padded `generate` does.

With `prefill_chunk_tokens`, admitted rows hold their slots while their prompts are cached
piece by piece: one piece batch of at most that many tokens per host check, between decode
runs, so live rows never wait for more than one piece; pieces run back to back while fewer
rows decode than wait for their prompt (nothing worth protecting from the stall).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from vpo_ray.pipeline.decoder import DecodeBatch

log = logging.getLogger(__name__)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def decode_batch_for(engine, n_rows: int, need_len: int, need_new: int, pin: bool = False) -> DecodeBatch:
    """The engine's DecodeBatch if it fits these rows (graphs stay captured), else a new one.

    A batch with more than twice the slots a call needs is replaced (empty slots still cost
    compute every step), unless it was pinned by `LLMEngine.prepare`."""
    cfg, w = engine.cfg, engine.weights
    want = min(n_rows, cfg.max_batch_rows)
    old = engine._batch
    if (old is not None and old.max_len >= need_len and old.max_new >= need_new and want <= old.slots
            and (old.slots <= 2 * want or old.pinned)):
        return old
    engine._batch = None
    del old
    max_len, max_new = _round_up(need_len, cfg.kv_bucket), _round_up(need_new, 64)
    slots = want
    if w.device.type == "cuda":
        slots = min(slots, _slots_that_fit(engine, max_len))
    batch = DecodeBatch(w, slots, max_len, max_new, engine.eos_ids, cuda_graphs=cfg.cuda_graphs, compile=cfg.compile,
                        top_k=cfg.sampler_top_k)
    batch.pinned = pin
    engine._batch = batch
    return batch


def _slots_that_fit(engine, max_len: int) -> int:
    """Slots whose KV cache and sampler workspace fit in `kv_cache_fraction` of the free GPU memory."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    w, cfg = engine.weights, engine.cfg
    free, _ = torch.cuda.mem_get_info(w.device)
    inter = w.layers[0].wgu.shape[0] // 2
    fixed = cfg.prefill_tokens * (12 * w.hidden + 6 * inter) * 2 + (1 << 30)  # prefill activations + slack
    per_slot = w.kv_bytes_per_token() * max_len + w.vocab * 40  # K/V + the sampler's sort buffers (+ fallback rows)
    fit = int((free * cfg.kv_cache_fraction - fixed) // per_slot)
    if fit < 1:
        raise MemoryError(f"LLMEngine: no KV-cache slot of {max_len} positions fits in {free / 2**30:.1f} GiB free")
    return fit


@dataclass
class _Prefilling:
    """A row that holds a slot while its prompt is cached piece by piece (chunked prefill)."""
    slot: int
    row: object  # llm_engine._Row
    cached: int = 0  # prompt tokens in the cache so far

    @property
    def left(self) -> int:
        return len(self.row.ids) - self.cached


class SlotScheduler:
    """Runs one `generate_ids` call on the static back-end."""

    def __init__(self, engine, rows: list, stop):
        self.e, self.cfg, self.rows, self.stop = engine, engine.cfg, rows, tuple(stop)
        self.out: list = [None] * len(rows)
        self.live: dict = {}  # slot -> row
        self.pending: list[_Prefilling] = []  # rows in slots whose prompts are still being cached (chunked)
        self.steps: dict = {}  # slot -> tokens generated at the last check
        self.scanned: dict = {}  # slot -> tokens already scanned for stop strings
        self.overlap = max((len(s) for s in self.stop), default=0) + 4  # tokens a stop string can straddle
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_tokens": 0, "prefill_padded_tokens": 0,
                      "prefill_batches": 0, "checks": 0, "generated_tokens": 0, "sampled_tokens": 0,
                      # host check at which each row (caller's order) got a slot, and at which it began decoding
                      "admitted_at_check": [], "started_at_check": []}

    def run(self) -> list:
        from vpo_ray.pipeline.llm_engine import _RowOut

        todo = []
        for r in self.rows:
            if r.limit <= 0:
                self.out[r.index] = _RowOut([], "limit")
            else:
                todo.append(r)
        if not todo:
            return self.out
        batch = decode_batch_for(self.e, len(todo), max(len(r.ids) + r.limit for r in todo),
                                 max(r.limit for r in todo))
        counters0 = self._counters(batch)
        queue = deque(sorted(todo, key=lambda r: len(r.ids)))
        free = list(range(batch.slots - 1, -1, -1))
        self.stats["admitted_at_check"] = [None] * len(self.rows)
        self.stats["started_at_check"] = [None] * len(self.rows)
        while queue or self.live or self.pending:
            if queue and free and self._refill_now(len(free), len(queue), batch.slots):
                self._admit(batch, queue, free)
            if self.pending:
                self._prefill_pieces(batch)
            if self.live:
                self._decode(batch, free)
        counters = {k: v - counters0[k] for k, v in self._counters(batch).items()}
        self.stats.update(slots=batch.slots, max_len=batch.max_len, graphs=len(batch.graphs), **counters,
                          graph_mode=("off" if not batch.use_graphs else
                                      "full" if all(g.logits is None for g in batch.graphs.values()) else "forward"))
        self.e.stats.update(self.stats)
        return self.out

    @staticmethod
    def _counters(batch: DecodeBatch) -> dict:
        """The batch's running totals (this call's share is the difference over the call)."""
        return {"decode_steps": batch.steps_run, "kv_reads": int(batch.kv_reads),
                "sampler_full_sort_tokens": int(batch.full_sorted), "sampler_waited_row_steps": int(batch.waited)}

    def _refill_now(self, n_free: int, n_queued: int, slots: int) -> bool:
        """Whether queued rows take free slots at this check."""
        if not self.live and not self.pending:
            return True  # nothing decodes: fill (the first fill, or the next wave)
        if not self.cfg.continuous:
            return False
        if self.cfg.refill_every_check:
            return True
        return n_free >= min(self.cfg.refill_min_free or max(1, slots // 8), n_queued)

    def _admit(self, batch: DecodeBatch, queue: deque, free: list) -> None:
        take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        for r in take:
            self.stats["admitted_at_check"][r.index] = self.stats["checks"]
        if self.cfg.prefill_chunk_tokens:  # slots taken now, prompts cached piece by piece
            new = [_Prefilling(free.pop(), r) for r in take]
            batch.hold([p.slot for p in new])
            self.pending += new
            return
        t0 = time.perf_counter()
        start = 0
        while start < len(take):  # prefill batches within the token budget (rows are sorted by length)
            stop = start + 1
            while stop < len(take) and len(take[stop].ids) * (stop + 1 - start) <= self.cfg.prefill_tokens:
                stop += 1
            self._prefill(batch, take[start:stop], [free.pop() for _ in range(stop - start)])
            start = stop
        _sync(batch)
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _prefill(self, batch: DecodeBatch, rows: list, slots: list) -> None:
        dev = batch.w.device
        ids, lengths = self.e._right_pad([r.ids for r in rows])
        batch.admit(slots, ids, lengths, *self._row_tensors(rows, dev))
        self._went_live(slots, rows)
        self._count_prefill(ids.numel())

    def _went_live(self, slots: list, rows: list) -> None:
        for s, r in zip(slots, rows):
            self.live[s], self.steps[s], self.scanned[s] = r, 1, 0
            self.stats["started_at_check"][r.index] = self.stats["checks"]
        self.stats["prefill_tokens"] += sum(len(r.ids) for r in rows)

    def _count_prefill(self, padded_tokens: int) -> None:
        self.stats["prefill_padded_tokens"] += padded_tokens
        self.stats["prefill_batches"] += 1

    def _prefill_pieces(self, batch: DecodeBatch) -> None:
        """One piece batch of at most `prefill_chunk_tokens`, more while fewer rows decode than wait."""
        t0 = time.perf_counter()
        self._prefill_piece(batch)
        while self.pending and len(self.live) < len(self.pending):
            self._prefill_piece(batch)
        _sync(batch)
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _prefill_piece(self, batch: DecodeBatch) -> None:
        """The next pieces of the first pending rows (rows x widest piece <= the budget); rows whose
        prompt is then whole sample their first token and go live."""
        budget = self.cfg.prefill_chunk_tokens
        group, width = [], 0
        for p in self.pending:
            piece = min(p.left, budget)
            if group and (len(group) + 1) * max(width, piece) > budget:
                break
            group.append(p)
            width = max(width, piece)
        pieces = [p.row.ids[p.cached:p.cached + width] for p in group]
        ids, _ = self.e._right_pad(pieces)
        dev = batch.w.device
        starts = torch.tensor([p.cached for p in group], dtype=torch.int64, device=dev)
        ends = starts + torch.tensor([len(piece) for piece in pieces], dtype=torch.int64, device=dev)
        slots = [p.slot for p in group]
        if all(p.cached == 0 for p in group):  # first pieces: the unchunked prefill's own path
            logits = batch.w.last_logits(ids, ends - starts, batch.cache, torch.tensor(slots, device=dev))
        else:
            logits = batch.prefill_piece(slots, ids, starts, ends)
        for p, piece in zip(group, pieces):
            p.cached += len(piece)
        self._count_prefill(ids.numel())
        whole = [k for k, p in enumerate(group) if p.left == 0]
        if whole:
            self._start(batch, [group[k] for k in whole], logits[whole])
        self.pending = [p for p in self.pending if p.left > 0]

    def _start(self, batch: DecodeBatch, done: list, logits) -> None:
        dev = batch.w.device
        rows, slots = [p.row for p in done], [p.slot for p in done]
        batch.start_rows(torch.tensor(slots, dtype=torch.int64, device=dev), logits,
                         torch.tensor([len(r.ids) for r in rows], dtype=torch.int64, device=dev),
                         *self._row_tensors(rows, dev))
        self._went_live(slots, rows)

    @staticmethod
    def _row_tensors(rows: list, dev) -> tuple:
        """Per-row sampling settings as the batch takes them: seeds, temperatures, top-p, limits, no-EOS."""
        return (torch.tensor([r.seed for r in rows], dtype=torch.int64, device=dev),
                torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=dev),
                torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=dev),
                torch.tensor([r.limit for r in rows], dtype=torch.int64, device=dev),
                torch.tensor([r.no_eos for r in rows], dtype=torch.bool, device=dev))

    def _decode(self, batch: DecodeBatch, free: list) -> None:
        t0 = time.perf_counter()
        k = self.cfg.sync_every
        need = max(len(r.ids) + min(r.limit, self.steps[s] + k) for s, r in self.live.items())
        batch.run(min(batch.max_len, _round_up(need, self.cfg.kv_bucket)), k)
        active, steps = batch.snapshot()
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["checks"] += 1
        for s in self.live:
            self.steps[s] = steps[s]
        done = [s for s in self.live if not active[s]]
        if self.stop:
            done += self._stopped([s for s in self.live if active[s]], batch)
        if done:
            self._collect(batch, done, free)

    def _stopped(self, slots: list, batch: DecodeBatch) -> list:
        """Live rows whose newest tokens completed a stop string: ended now, on the device too."""
        if not slots:
            return []
        decode = self.e.tok.decode
        tokens = batch.tokens_of(slots, max(self.steps[s] for s in slots))
        hit = []
        for s, ids in zip(slots, tokens):
            window = ids[max(0, self.scanned[s] - self.overlap):self.steps[s]]
            self.scanned[s] = self.steps[s]
            text = decode(window, skip_special_tokens=True)
            if any(st in text for st in self.stop):
                hit.append(s)
        if hit:
            batch.deactivate(hit)
        return hit

    def _collect(self, batch: DecodeBatch, done: list, free: list) -> None:
        tokens = batch.tokens_of(done, max(self.steps[s] for s in done))
        for s, ids in zip(done, tokens):
            row = self.live.pop(s)
            self.out[row.index] = self.e._finish(row, ids[:self.steps[s]], self.stop)
            self.stats["generated_tokens"] += len(self.out[row.index].ids)
            self.stats["sampled_tokens"] += self.steps[s]
            free.append(s)


def _sync(batch: DecodeBatch) -> None:
    if batch.w.device.type == "cuda":
        torch.cuda.synchronize(batch.w.device)
