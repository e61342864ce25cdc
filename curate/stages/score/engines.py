"""Scoring engines: vLLM offline in this process, or any OpenAI-compatible server.

Both take the same requests (a rendered prompt and its token ids) and return the same
``RawOutput`` (constrained text, logprobs of the label tokens per step, prompt and cached token
counts), so the stage reads scores identically whichever engine ran. A request is either a
main request (decode a label "0".."10" under a choice constraint) or a follow-up (the prompt
extended by one ambiguous first token, one step over that token's continuations; see
``curate.stages.score.labels``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from curate.core.errors import CurateError
from curate.stages.score.config import ScoreConfig
from curate.stages.score.labels import LabelSet, RawOutput

CPU_KV_CACHE_BYTES = 256 * 1024 * 1024


# Added to the ambiguous first token's logit in a probe: far above any logit gap.
PROBE_BIAS = 100.0


class EngineError(CurateError):
    """The engine cannot run at all (server unreachable, model missing)."""


@dataclass
class EngineRequest:
    prompt: str  # full prompt text, chat template applied
    prompt_ids: list[int]
    images: Sequence[str] = ()  # VLM only: image paths in placeholder order
    next_after: int | None = None  # follow-up: extend the prompt by this token, one step


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0  # generated: one decode step each
    cache_known: bool = False  # the engine reports cached tokens
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, out: RawOutput) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += out.prompt_tokens
            self.output_tokens += len(out.token_ids)
            if out.cached_tokens is not None:
                self.cached_tokens += out.cached_tokens
                self.cache_known = True

    @property
    def cache_hit_rate(self) -> float | None:
        if not self.cache_known or not self.prompt_tokens:
            return None
        return self.cached_tokens / self.prompt_tokens


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class VllmEngine:
    """``vllm.LLM`` in this process; every call is one batched ``generate``."""

    def __init__(self, cfg: ScoreConfig, model: Path, labels: LabelSet) -> None:
        import torch

        self.cfg = cfg
        self.labels = labels
        self.stats = EngineStats()
        # vLLM's CPU worker lowers torch's thread count and replaces torch.set_num_threads
        # with a no-op for the whole process; close() puts both back, or a later fork (a
        # DataLoader worker that calls set_num_threads(1)) hangs in the inherited OpenMP pool.
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        self.llm = _make_llm(cfg, model)
        self._params: dict[int | None, object] = {}
        # One request per sample gives all label probabilities (see ScoreConfig.readout).
        self.probing = cfg.readout == "probe" and labels.probe_token is not None

    def _sampling(self, next_after: int | None):
        if next_after not in self._params:
            self._params[next_after] = sampling_params(
                self.labels, probe=self.probing, next_after=next_after
            )
        return self._params[next_after]

    def _prompt(self, req: EngineRequest):
        if self.cfg.vlm and req.images:
            from PIL import Image

            text = req.prompt
            if req.next_after is not None:
                text += self.labels.first[req.next_after]
            images = [Image.open(p).convert("RGB") for p in req.images]
            return {"prompt": text, "multi_modal_data": {"image": images}}
        ids = req.prompt_ids if req.next_after is None else [*req.prompt_ids, req.next_after]
        return {"prompt_token_ids": ids}

    def run(self, requests: Sequence[EngineRequest]) -> list[RawOutput]:
        if not requests:
            return []
        t0 = time.perf_counter()
        outputs = self.llm.generate(
            [self._prompt(r) for r in requests],
            [self._sampling(r.next_after) for r in requests],
            use_tqdm=False,
        )
        results = []
        for req, out in zip(requests, outputs, strict=True):
            comp = out.outputs[0]
            raw = RawOutput(
                text=comp.text,
                token_ids=list(comp.token_ids),
                steps=logprob_steps(comp.logprobs),
                prompt_tokens=len(out.prompt_token_ids or []),
                cached_tokens=out.num_cached_tokens,
                probe=self.probing and req.next_after is None,
            )
            if comp.finish_reason not in ("stop", "length"):
                raw.error = f"engine finished with {comp.finish_reason!r}"
            self.stats.add(raw)
            results.append(raw)
        self.stats.seconds += time.perf_counter() - t0
        return results

    def close(self) -> None:
        import gc

        import torch

        self.llm = None
        gc.collect()
        set_num_threads, n = self._torch_threads
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(n)


def sampling_params(labels: LabelSet, *, probe: bool, next_after: int | None = None):
    """vLLM ``SamplingParams`` of one request: a probe, a constrained label, or a follow-up
    (the prompt extended by ``next_after``, one step over its continuations).

    Every request asks for the label tokens' logprobs only (``logprob_token_ids``, without
    ``logprobs=N``: that would add a top-k over the vocabulary per step that vLLM's sampler
    computes and then discards), in flat lists (one object per request, not one per token and
    step).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    common = {"temperature": 0.0, "flat_logprobs": True}
    if next_after is not None:
        ids = sorted(labels.next[next_after])
        return SamplingParams(
            max_tokens=1,
            logprob_token_ids=ids,
            allowed_token_ids=ids,
            detokenize=False,  # only the step's logprobs are read
            **common,
        )
    if probe:
        # Raw logprobs are taken before logit_bias applies (vLLM's sampler), so step 1 gives
        # the model's own first-token distribution while the bias makes the decode go through
        # the ambiguous token, and step 2 gives P(. | that token). The same forward work as a
        # choice-constrained label, whose grammar ends a label by sampling EOS: 2 steps too.
        return SamplingParams(
            max_tokens=2,
            logprob_token_ids=labels.logprob_token_ids,
            logit_bias={labels.probe_token: PROBE_BIAS},
            detokenize=False,  # the output is no label: only its logprobs are read
            **common,
        )
    return SamplingParams(
        max_tokens=labels.max_tokens,
        logprob_token_ids=labels.logprob_token_ids,
        structured_outputs=StructuredOutputsParams(choice=list(labels.labels)),
        **common,
    )


def logprob_steps(logprobs) -> list[dict[int, float]]:
    """Token id -> logprob per generated step, from vLLM's flat lists (``flat_logprobs``) or
    its list of ``{id: Logprob}`` dicts."""
    if not logprobs:
        return []
    flat = getattr(logprobs, "start_indices", None)
    if flat is None:
        return [{tid: lp.logprob for tid, lp in step.items()} for step in logprobs]
    ids, values = logprobs.token_ids, logprobs.logprobs
    return [
        dict(zip(ids[a:b], values[a:b], strict=True))
        for a, b in zip(flat, logprobs.end_indices, strict=True)
    ]


def llm_kwargs(cfg: ScoreConfig, model: Path, *, on_cpu: bool) -> dict:
    """The ``vllm.LLM`` arguments of one judge engine (every key is a field of vLLM's
    ``EngineArgs``; tests/stages/score/test_engine_args.py checks them against vLLM).

    One engine is one replica: tensor parallel inside it is ``tensor_parallel_size``; data
    parallel is several engines (``score.data_parallel_size`` engine actors on the Ray
    executor, ``ray_engine``), never ``data_parallel_size`` in one ``LLM``, which vLLM
    refuses in a single process.
    """
    if cfg.data_parallel_size > 1 or "data_parallel_size" in cfg.engine_kwargs:
        raise EngineError(
            f"score.data_parallel_size {cfg.data_parallel_size} asks for several judge "
            "engines, which run as engine actors on the Ray executor (executor: {kind: ray}; "
            "with no address it starts Ray on this machine, one engine per "
            "tensor_parallel_size GPUs); vLLM refuses data_parallel_size in one process"
        )
    kwargs: dict = {
        "model": str(model),
        "tokenizer": str(cfg.tokenizer or model),
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "enforce_eager": on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        "enable_prefix_caching": True,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "seed": 0,
    }
    if cfg.tensor_parallel_size == 1:
        kwargs["distributed_executor_backend"] = "uni"
    if cfg.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    elif on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES  # vLLM would take 13 GiB
    if cfg.vlm:
        kwargs["limit_mm_per_prompt"] = {"image": 64}
    kwargs.update(cfg.engine_kwargs)
    return kwargs


def _make_llm(cfg: ScoreConfig, model: Path):
    """Build ``vllm.LLM``; on a CPU (and for one-GPU runs) the engine runs in this process."""
    if cfg.tensor_parallel_size == 1:
        # In-process engine: starts in seconds instead of spawning three processes.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM
    from vllm.platforms import current_platform

    kwargs = llm_kwargs(cfg, model, on_cpu=current_platform.is_cpu())
    try:
        return LLM(**kwargs)
    except (ValueError, RuntimeError, TypeError, OSError, MemoryError) as e:
        # A bad value (max_model_len above the model's), a KV cache that does not fit, an
        # engine_kwargs key vLLM does not know: the user fixes a setting, not the code.
        raise EngineError(f"the judge {model} cannot start in vLLM: {engine_problem(e)}") from e


def engine_problem(e: BaseException, max_chars: int = 600) -> str:
    """The sentence that says what is wrong, from vLLM's (often pydantic) error."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            text = "; ".join(str(x.get("msg", x)) for x in errors())
        except Exception:  # noqa: BLE001 - not pydantic's errors() after all
            text = str(e)
    else:
        text = str(e) or type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


class OpenAIEngine:
    """Client of an OpenAI-compatible server: ``/v1/completions`` with the rendered prompt,
    bounded concurrency, timeouts and retries with exponential back-off."""

    def __init__(self, cfg: ScoreConfig, labels: LabelSet) -> None:
        import httpx

        if cfg.vlm:
            raise EngineError("a VLM judge needs engine: vllm (completions take no images)")
        self.cfg = cfg
        self.labels = labels
        self.stats = EngineStats()
        self.base_url = cfg.server_url.rstrip("/")
        self._down: EngineError | None = None  # once the server is gone, fail fast
        self.client = httpx.Client(
            timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=cfg.concurrency),
        )
        self.model = cfg.served_model_name or self._first_model()

    def _first_model(self) -> str:
        data = self._request("GET", "/models").json().get("data") or []
        if not data:
            raise EngineError(f"the server at {self.base_url} serves no model")
        return data[0]["id"]

    def _request(self, method: str, path: str, body: dict | None = None):
        """One HTTP call with retries on connection errors, timeouts, 429 and 5xx."""
        import httpx

        if self._down is not None:
            raise self._down
        url = self.base_url + path
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.retries + 1):
            try:
                resp = self.client.request(method, url, json=body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp
                problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if attempt < self.cfg.retries:
                time.sleep(delay)
                delay *= 2
        self._down = EngineError(
            f"cannot reach the scoring server at {url} after {self.cfg.retries + 1} tries "
            f"({problem}). Start one, e.g. `python -m vllm.entrypoints.openai.api_server "
            f"--model DIR --host 127.0.0.1 --port 8000`, or set server_url."
        )
        raise self._down

    def _body(self, req: EngineRequest) -> dict:
        labels = self.labels
        body: dict = {"model": self.model, "temperature": 0.0}
        extras = self.cfg.server_vllm_extras
        if req.next_after is None:
            body.update(prompt=req.prompt, max_tokens=labels.max_tokens)
            ids = labels.logprob_token_ids
            if extras:
                body.update(structured_outputs={"choice": list(labels.labels)})
        else:
            # Token ids, not text: appending the token's text could merge with the prompt's
            # last token and change the tokenisation.
            body.update(prompt=[*req.prompt_ids, req.next_after], max_tokens=1)
            ids = sorted(labels.next[req.next_after])
            if extras:
                body.update(allowed_token_ids=ids)
        if extras:
            body.update(
                logprobs=len(ids),
                logprob_token_ids=ids,
                add_special_tokens=False,
                return_tokens_as_token_ids=True,
            )
        else:
            body.update(logprobs=5)
        return body

    def _one(self, req: EngineRequest) -> RawOutput:
        if req.next_after is not None and not self.cfg.server_vllm_extras:
            return RawOutput()  # no follow-ups without token-id prompts: shortest label
        resp = self._request("POST", "/completions", self._body(req))
        if resp.status_code != 200:
            try:
                message = resp.json().get("error", {}).get("message") or resp.text
            except (ValueError, AttributeError):
                message = resp.text
            problem = f"(HTTP {resp.status_code}): {str(message)[:300]}"
            if resp.status_code not in (400, 413, 422):
                # Wrong URL, model name or credentials: every request would fail the same way.
                self._down = EngineError(f"the scoring server at {self.base_url} failed {problem}")
                raise self._down
            return RawOutput(error=f"server rejected the request {problem}")
        data = resp.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        raw = RawOutput(
            text=choice.get("text"),
            prompt_tokens=int(usage.get("prompt_tokens") or len(req.prompt_ids)),
            cached_tokens=details.get("cached_tokens"),
        )
        lp = choice.get("logprobs") or {}
        ids = (self._token_id(s) for s in lp.get("tokens") or [])
        raw.token_ids = [t for t in ids if t is not None]
        raw.steps = [
            {tid: v for k, v in (step or {}).items() if (tid := self._token_id(k)) is not None}
            for step in lp.get("top_logprobs") or []
        ]
        if choice.get("finish_reason") not in ("stop", "length", None):
            raw.error = f"server finished with {choice.get('finish_reason')!r}"
        self.stats.add(raw)
        return raw

    def _token_id(self, token: str) -> int | None:
        if token.startswith("token_id:"):
            return int(token[len("token_id:") :])
        for tid, text in self.labels.first.items():  # servers that return token text
            if text == token:
                return tid
        return None

    def run(self, requests: Sequence[EngineRequest]) -> list[RawOutput]:
        if not requests:
            return []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            results = list(pool.map(self._one, requests))
        self.stats.seconds += time.perf_counter() - t0
        return results

    def close(self) -> None:
        self.client.close()


def make_engine(cfg: ScoreConfig, model: Path, labels: LabelSet):
    if cfg.engine == "openai":
        return OpenAIEngine(cfg, labels)
    return VllmEngine(cfg, model, labels)
