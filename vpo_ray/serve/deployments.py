"""The two Ray Serve deployments of `vpo serve`.

    HTTP ──► proxy ──► OptimizerAPI (FastAPI ingress: auth, limits, validation, metrics)
                            │ DeploymentHandle (max_queued_requests = back-pressure)
                            ▼
                       OptimizerModel (autoscaled; @serve.batch: one generate per batch)

With `render=true` a third deployment, VideoRenderer (the T2V pipeline of
pipeline/t2v.py), turns an optimized prompt into an mp4 as an async job: POST /v1/render
answers 202 with a job id at once; GET /v1/render/{id} reads the job's status file
(`render_out/jobs/<id>.json`, written atomically by whichever replica has the job).

The ingress holds no model, so bad requests, auth failures and over-capacity answers
cost no model time, and every answer (503 included) is JSON. The model deployment is
the one that scales: its replicas take `num_gpus` on a GPU cluster.

The request path through the ingress, in order (each step answers its own errors):
  1. `_observe` middleware: counts and times every answer (metrics below);
  2. `_auth`: bearer token (401) - before the body is read;
  3. `_body`: at most `max_body_bytes` (413), JSON object (400/422);
  4. `validation.parse_*`: pydantic models, the config's limits (422; 400 unsupported);
  5. admission (`admission.py`): a request whose expected completion (requests in flight x
     recent time per completion) is past its deadline (X-VPO-Deadline-S, else `deadline_s`)
     gets 503 + Retry-After at once, before any model time is spent;
  6. `_optimize` -> `_call(OptimizerModel.optimize)`: 503 back-pressure or a dead
     replica, 504 past `request_timeout_s`;
  7. shaping: our JSON (/v1/optimize) or OpenAI's (`openai_compat`, SSE when streaming).
OpenAPI is served at /openapi.json (and /docs); request schemas come from validation.py.

Metrics (ray.serve.metrics; exported by each node's Ray metrics agent in Prometheus
format, the port in /tmp/ray/prom_metrics_service_discovery.json, or the node's
`--metrics-export-port`; names carry Ray's `ray_` prefix when scraped):
  vpo_serve_requests_total{route,status}     every HTTP answer of the ingress
  vpo_serve_request_latency_ms{route}        ingress latency (histogram)
  vpo_serve_batch_rows / vpo_serve_batch_requests   size of each generate call (histograms)
  vpo_serve_generate_ms                      time of each generate call (histogram)
  vpo_serve_fallback_prompts_total           outputs that did not parse (query returned instead)
"""
# no `from __future__ import annotations`: FastAPI must see real `Request` annotations through serve.ingress

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from vpo_ray import storage
from vpo_ray.config import ServeConfig, load_config
from vpo_ray.prompts import optimizer_input, parse_video_prompt
from vpo_ray.serve import openai_compat
from vpo_ray.serve import validation as v
from vpo_ray.serve.admission import AdmissionControl
from vpo_ray.serve.engine import GenRequest, OptimizerEngine, served_name
from vpo_ray.serve.query import clean_output, split_query

log = logging.getLogger("vpo_ray.serve")

DEADLINE_HEADER = "X-VPO-Deadline-S"  # a request's own deadline, seconds
ROUTES = ("/healthz", "/v1/optimize", "/v1/chat/completions", "/v1/models", "/v1/render")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
LATENCY_BOUNDS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128]


def config_from_dict(d: dict) -> ServeConfig:
    return load_config(ServeConfig, None, None, **d)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def batch_rows(items: list) -> int:
    """@serve.batch size of a batch: generated rows (a request asks for n), not requests."""
    return sum(int(it.get("n", 1)) for it in items)


# ---------------------------------------------------------------------------- model

@serve.deployment(name="OptimizerModel")
class OptimizerModel:
    """The optimizer LLM; concurrent requests share one left-padded `generate` call."""

    def __init__(self, cfg: dict):
        self.cfg = config_from_dict(cfg)
        self.engine = OptimizerEngine(self.cfg)
        self.generate_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")  # keeps the loop free
        self._rows = Histogram("vpo_serve_batch_rows", description="Rows (sum of n) per generate call.",
                               boundaries=BATCH_BOUNDS)
        self._reqs = Histogram("vpo_serve_batch_requests", description="Requests per generate call.",
                               boundaries=BATCH_BOUNDS)
        self._gen_ms = Histogram("vpo_serve_generate_ms", description="Time of one generate call (ms).",
                                 boundaries=LATENCY_BOUNDS_MS)

    async def info(self) -> dict:
        return self.engine.info()

    async def optimize(self, gen: dict) -> dict:
        return await self.generate_batch(gen)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=batch_rows)
    async def generate_batch(self, gens: list[dict]) -> list[dict]:
        reqs = [GenRequest(**g) for g in gens]
        t0 = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.generate, reqs)
        self._gen_ms.observe((time.perf_counter() - t0) * 1000)
        self._rows.observe(results[0].batch_rows)
        self._reqs.observe(len(reqs))
        return [dataclasses.asdict(r) for r in results]


# ---------------------------------------------------------------------------- render jobs

def job_uri(root: str, job_id: str) -> str:
    return storage.safe_join(root, "jobs", f"{job_id}.json")


def write_job(root: str, job: dict) -> None:
    storage.write_json(job_uri(root, job["id"]), job)


@serve.deployment(name="VideoRenderer")
class VideoRenderer:
    """The T2V pipeline; renders one job at a time and records its status in render_out/jobs/."""

    def __init__(self, cfg: dict):
        from vpo_ray.pipeline.t2v import T2VRenderer

        self.cfg = config_from_dict(cfg)
        self.renderer = T2VRenderer(self.cfg.t2v_model or self.cfg.preset, self.cfg.video,
                                    out_root=self.cfg.render_out)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")

    async def render(self, job: dict) -> dict:
        root = self.cfg.render_out
        job = {**job, "status": "running", "started_at": time.time()}
        write_job(root, job)
        flags = job.get("flags") or {}
        uri = storage.safe_join(root, "videos", f"{job['id']}.mp4")
        call = functools.partial(self.renderer.render, job["prompt"], flags.get("negative_prompt") or "",
                                 int(job["video_seed"]), flags.get("aspect_ratio") or "", None, uri)
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, call)
            job.update(status="done", video_uri=uri, frames=len(out["frames"]), height=out["height"],
                       width=out["width"], fps=self.cfg.video.fps)
        except Exception as e:  # noqa: BLE001 - the job records its failure
            log.exception("render job %s failed", job["id"])
            job.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
        job["finished_at"] = time.time()
        write_job(root, job)
        return job


# ---------------------------------------------------------------------------- ingress

api = FastAPI(title="vpo_ray optimizer", description="Optimizes text-to-video prompts (VPO); OpenAI-compatible "
              "chat completions", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
_metrics: dict = {}


def _route_label(request: Request) -> str:
    path = request.url.path
    root = request.scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    if path.startswith("/v1/render/"):
        return "/v1/render/{id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in ROUTES else "other"


def _error(exc: v.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(v.ApiError)
async def _api_error(request: Request, exc: v.ApiError):
    return _error(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = "not_found" if exc.status_code == 404 else "invalid_request"
    return _error(v.ApiError(exc.status_code, None, str(exc.detail), code=code))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error on %s", _route_label(request))
    return _error(v.ApiError(500, None, "internal error (see the server log)", kind="server_error"))


@api.middleware("http")
async def _observe(request: Request, call_next):
    t0 = time.perf_counter()
    status = 500  # an exception escaping the app is answered 500 by Starlette's outermost handler
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        if _metrics:
            route = _route_label(request)
            _metrics["requests"].inc(tags={"route": route, "status": str(status)})
            _metrics["latency"].observe((time.perf_counter() - t0) * 1000, tags={"route": route})


def _init_metrics() -> None:
    if not _metrics:
        _metrics["requests"] = Counter("vpo_serve_requests", description="HTTP answers by route and status.",
                                       tag_keys=("route", "status"))
        _metrics["latency"] = Histogram("vpo_serve_request_latency_ms", description="Ingress latency (ms).",
                                        boundaries=LATENCY_BOUNDS_MS, tag_keys=("route",))
        _metrics["fallback"] = Counter("vpo_serve_fallback_prompts",
                                       description="Outputs that did not parse; the query was returned instead.")


def _count_fallbacks(k: int) -> None:
    # Module-level on purpose: the deployment class travels to replicas by value (its module
    # name points at the Deployment object), so its methods must not touch module state directly.
    if "fallback" in _metrics:
        _metrics["fallback"].inc(k)


@serve.deployment(name="OptimizerAPI")
@serve.ingress(api)
class OptimizerAPI:
    """Auth, limits, validation and response shaping; forwards work to OptimizerModel."""

    def __init__(self, model, cfg: dict, token_sha256: Optional[str] = None, renderer=None):
        self.cfg = config_from_dict(cfg)
        self.model = model
        self.renderer = renderer
        self._render_tasks: set = set()
        env_token = os.environ.get(self.cfg.auth_token_env) if self.cfg.auth_token_env else None
        # The builder passes a digest of the token it saw; the replica's own env is the fallback.
        self._token = token_sha256 or (token_digest(env_token) if env_token else None)
        self.name = served_name(self.cfg)
        self._info: Optional[dict] = None
        self.admission = AdmissionControl() if self.cfg.admission else None
        _init_metrics()

    # -- plumbing

    def _auth(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        ok = scheme.lower() == "bearer" and presented.strip() != "" and \
            hmac.compare_digest(token_digest(presented.strip()), self._token)
        if not ok:
            raise v.ApiError(401, "authorization", "missing or invalid bearer token", kind="authentication_error",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> dict:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise v.ApiError(413, "body", f"request body is {declared} bytes; the limit is {limit}",
                             code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise v.ApiError(413, "body", f"request body exceeds the limit of {limit} bytes",
                                 code="body_too_large")
            chunks.append(chunk)
        return v.parse_json_body(b"".join(chunks), limit)

    async def _model_info(self) -> dict:
        if self._info is None:
            self._info = await self._call(self.model.info.remote())
        return self._info

    async def _call(self, response):
        try:
            return await asyncio.wait_for(response, timeout=self.cfg.request_timeout_s)
        except BackPressureError as e:
            retry = e.retry_after_s if e.retry_after_s is not None else self.cfg.retry_after_s
            raise v.ApiError(503, None, "the optimizer is over capacity; retry later", kind="overloaded",
                             headers={"Retry-After": str(max(1, math.ceil(retry)))}) from None
        except (DeploymentUnavailableError, RayActorError):
            # RayActorError: the replica holding this request died (a crash, a lost node). Nothing
            # was returned, so the request is safe to send again: 503 tells clients to retry.
            raise v.ApiError(503, None, "the optimizer is not available; retry", kind="unavailable",
                             headers={"Retry-After": str(max(1, math.ceil(self.cfg.retry_after_s)))}) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise v.ApiError(504, None, f"no answer within {self.cfg.request_timeout_s:g} s",
                             kind="timeout") from None
        except v.ApiError:
            raise
        except Exception:
            log.exception("optimizer call failed")
            raise v.ApiError(500, None, "generation failed (see the server log)", kind="server_error") from None

    def _deadline(self, request: Request) -> float:
        """The request's deadline in seconds: its X-VPO-Deadline-S header, else the config's."""
        raw = request.headers.get(DEADLINE_HEADER)
        if raw is None:
            return self.cfg.deadline_s or self.cfg.request_timeout_s
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not 0 < value <= self.cfg.request_timeout_s:  # NaN fails too
            raise v.invalid(DEADLINE_HEADER, f"expected seconds in (0, {self.cfg.request_timeout_s:g}]")
        return value

    async def _admitted_call(self, gen: GenRequest, deadline_s: float) -> dict:
        """The model call, if the request can be answered within its deadline; else 503 at once."""
        if self.admission is None:
            return await self._call(self.model.optimize.remote(dataclasses.asdict(gen)))
        decision = self.admission.decide(deadline_s)
        if not decision.admit:
            raise v.ApiError(503, None, f"the optimizer cannot answer within the {deadline_s:g} s deadline now "
                             f"(about {decision.expected_s:.1f} s expected); retry after {decision.retry_after_s} s",
                             kind="overloaded", code="deadline_exceeded",
                             headers={"Retry-After": str(decision.retry_after_s)})
        completed = False
        try:
            out = await self._call(self.model.optimize.remote(dataclasses.asdict(gen)))
            completed = True
            return out
        finally:
            self.admission.finished(completed)

    async def _optimize(self, req: v.OptimizeRequest, field: str, deadline_s: float) -> tuple[dict, dict]:
        text, flags = split_query(req.query)
        if not text:
            raise v.invalid(field, f"'{field}' holds only flags; there is nothing to optimize")
        given = optimizer_input({"query": req.query, "text": text}, self.cfg.prompts.optimizer_input)
        gen = GenRequest(text=given, n=req.n,
                         temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                         max_new_tokens=req.max_new_tokens, stop=req.stop)
        out = await self._admitted_call(gen, deadline_s)
        prompts, fallbacks = [], 0
        for raw in out["texts"]:
            parsed = parse_video_prompt(clean_output(raw))
            if not parsed:
                fallbacks += 1
                parsed = text
            prompts.append(parsed)
        if fallbacks:
            _count_fallbacks(fallbacks)
        return {"prompts": prompts, "text": text, "flags": dataclasses.asdict(flags), "fallbacks": fallbacks}, out

    @staticmethod
    def _batch_headers(out: dict) -> dict:
        return {"X-VPO-Batch-Rows": str(out["batch_rows"]), "X-VPO-Batch-Requests": str(out["batch_requests"])}

    # -- routes

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        info = await self._model_info()
        return {"object": "list", "data": [openai_compat.model_card(self.name, info["model_version"])]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        self._auth(request)
        if model_id != self.name:
            raise v.ApiError(404, "model", f"the requested model is not served here; this server serves "
                             f"'{self.name}'", code="model_not_found")
        info = await self._model_info()
        return openai_compat.model_card(self.name, info["model_version"])

    @api.post("/v1/optimize", openapi_extra=v.request_schema(v.OptimizeBody))
    async def optimize(self, request: Request):
        t0 = time.perf_counter()
        self._auth(request)
        doc = await self._body(request)
        req = v.parse_optimize(doc, self.cfg)
        result, out = await self._optimize(req, "query", self._deadline(request))
        body = {"prompts": result["prompts"], "query": doc["query"], "text": result["text"],
                "flags": result["flags"], "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
                "model": out["model"], "model_version": out["model_version"], "fallbacks": result["fallbacks"],
                # a prompt the token limit cut is unfinished: say so rather than pass it off as complete
                "finish_reasons": out["finish_reasons"], "truncated": "length" in out["finish_reasons"],
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": sum(out["completion_tokens"])}}
        return JSONResponse(body, headers=self._batch_headers(out))

    @api.post("/v1/chat/completions", openapi_extra=v.request_schema(v.ChatCompletionBody))
    async def chat_completions(self, request: Request):
        t0 = time.perf_counter()
        self._auth(request)
        doc = await self._body(request)
        req, opts = v.parse_chat(doc, self.cfg, self.name)
        result, out = await self._optimize(req, "messages", self._deadline(request))
        body = openai_compat.chat_completion(result, out, opts.model, round((time.perf_counter() - t0) * 1000, 2))
        if opts.stream:
            return StreamingResponse(openai_compat.chat_chunks(body, opts.include_usage),
                                     media_type="text/event-stream", headers=self._batch_headers(out))
        return JSONResponse(body, headers=self._batch_headers(out))


    # -- render jobs

    def _render_enabled(self) -> None:
        if self.renderer is None:
            raise v.ApiError(404, None, "rendering is not enabled on this server (render=true)", code="not_found")

    async def _track(self, job: dict) -> None:
        try:
            await self.renderer.render.remote(job)
        except Exception as e:  # noqa: BLE001 - the renderer died or shed the job: say so in the job
            log.warning("render job %s failed: %s", job["id"], type(e).__name__)
            write_job(self.cfg.render_out, {**job, "status": "failed", "error": f"renderer: {type(e).__name__}",
                                            "finished_at": time.time()})

    @api.post("/v1/render")
    async def render(self, request: Request):
        self._auth(request)
        self._render_enabled()
        doc = await self._body(request)
        req, video_seed = v.parse_render(doc, self.cfg)
        if len(self._render_tasks) >= self.cfg.render_max_jobs:
            raise v.ApiError(503, None, f"{len(self._render_tasks)} render jobs in progress; retry later",
                             kind="overloaded", headers={"Retry-After": str(max(1, math.ceil(self.cfg.retry_after_s)))})
        result, out = await self._optimize(req, "query", self._deadline(request))
        job = {"id": uuid.uuid4().hex, "status": "queued", "query": doc["query"], "text": result["text"],
               "flags": result["flags"], "prompt": result["prompts"][0], "fallbacks": result["fallbacks"],
               "video_seed": video_seed if video_seed is not None else secrets.randbits(31),
               "model": out["model"], "model_version": out["model_version"], "created_at": time.time()}
        write_job(self.cfg.render_out, job)
        task = asyncio.create_task(self._track(job))
        self._render_tasks.add(task)
        task.add_done_callback(self._render_tasks.discard)
        return JSONResponse({**job, "status_url": f"/v1/render/{job['id']}"}, status_code=202)

    @api.get("/v1/render/{job_id}")
    async def render_status(self, job_id: str, request: Request):
        self._auth(request)
        self._render_enabled()
        if not JOB_ID.match(job_id):
            raise v.ApiError(404, "job_id", "no such render job", code="not_found")
        try:
            return storage.read_json(job_uri(self.cfg.render_out, job_id))
        except storage.StorageError:
            raise v.ApiError(404, "job_id", "no such render job", code="not_found") from None


def deployment_options(cfg: ServeConfig) -> tuple[dict, dict]:
    """(.options() of OptimizerModel, of OptimizerAPI) from the config."""
    a = cfg.autoscaling
    autoscaling = {k: val for k, val in dataclasses.asdict(a).items() if val is not None}
    pinned = {"accelerator_type": cfg.accelerator_type} if cfg.accelerator_type else {}
    model_opts = dict(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, **pinned},
        autoscaling_config=autoscaling,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"retry_after_s": cfg.retry_after_s},
    )
    api_opts = dict(
        num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        backpressure_config={"retry_after_s": cfg.retry_after_s},
    )
    return model_opts, api_opts


def build(cfg: ServeConfig, token_sha256: Optional[str] = None):
    """The Serve application (ingress bound to the model deployment, and the renderer if asked)."""
    model_opts, api_opts = deployment_options(cfg)
    cfg_dict = dataclasses.asdict(cfg)
    model = OptimizerModel.options(**model_opts).bind(cfg_dict)
    renderer = None
    if cfg.render:
        renderer = VideoRenderer.options(
            num_replicas=cfg.render_replicas, max_ongoing_requests=1,  # a replica renders one video at a time
            ray_actor_options={"num_cpus": cfg.render_num_cpus, "num_gpus": cfg.render_num_gpus},
        ).bind(cfg_dict)
    return OptimizerAPI.options(**api_opts).bind(model, cfg_dict, token_sha256, renderer)
