"""The HTTP API: list and select VAEs, encode, decode, round trip, compare, latent channels, interpolation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

import vaekit
from vaekit import families
from vaekit.errors import BadInputError, VaekitError
from vaekit.interfaces.server import payloads
from vaekit.interfaces.server.catalog import CatalogEntry
from vaekit.interfaces.server.engine import DecodeItem, WorkResult, padded
from vaekit.interfaces.server.state import ServerState, disconnect_watch
from vaekit.interfaces.server.views import channel_images, difference_image, headline_metrics, image_metrics
from vaekit.latent.interpolation import METHODS, interpolate_latents, match_size

router = APIRouter()
LATENT_DOWNSCALE = 8  # pixels per latent cell when a VAE's family does not say (the smallest of them all)
log = logging.getLogger("vaekit.server")

VaeQuery = Annotated[str | None, Query(description="VAE name, id or hash prefix from GET /vaes (default: selected)")]
PrecisionQuery = Annotated[str | None, Query(description="fp32, bf16, fp16 or auto (default: the server's)")]
TilingQuery = Annotated[str | None, Query(description="auto, off, exact (= on) or fast")]


def _upload_schema(*fields: str, raw_types: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp")) -> dict:
    props = {f: {"type": "string", "format": "binary"} for f in fields}
    content: dict[str, Any] = {"multipart/form-data": {"schema": {"type": "object", "properties": props}}}
    for t in raw_types:
        content[t] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def state_of(request: Request) -> ServerState:
    """The server state the lifespan put on the app."""
    return request.app.state.vaekit


async def upload(request: Request, *fields: str) -> list[bytes]:
    """The uploaded files: multipart fields ``fields`` (in order), or the raw body as the first and only one."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=len(fields) + 1, max_fields=len(fields) + 4)
        try:
            out = []
            for name in fields:
                part = form.get(name)
                if part is None and len(fields) == 1:  # one upload: accept whatever the single file was called
                    part = next((v for v in form.values() if hasattr(v, "read")), None)
                if part is None or not hasattr(part, "read"):
                    raise BadInputError(f"missing file field {name!r} in the form")
                out.append(await part.read())  # type: ignore[union-attr]
            return out
        finally:
            await form.close()
    if len(fields) > 1:
        raise BadInputError(f"send a multipart form with the files {', '.join(fields)}")
    return [await request.body()]


def _headers(entry: CatalogEntry, result: WorkResult | None, started: float) -> dict[str, str]:
    headers = {
        "X-Vaekit-VAE": entry.id,
        "X-Vaekit-VAE-SHA256": entry.sha256,
        "X-Vaekit-Seconds": f"{time.perf_counter() - started:.4f}",
    }
    if result is not None:
        headers["X-Vaekit-Dtype"] = result.dtype
        if result.notes:
            headers["X-Vaekit-Notes"] = "; ".join(result.notes).encode("ascii", "replace").decode()[:1000]
    return headers


def downscale(*entries: CatalogEntry) -> int:
    """Image pixels per latent cell, per side, of the entries' families (the largest): the multiple an image is
    padded to, and what a latent decodes to. The worker checks again with each loaded VAE's own figure."""
    out = LATENT_DOWNSCALE
    for entry in entries:
        try:
            out = max(out, families.get(entry.entry.family).latent_downscale)
        except VaekitError:  # a custom or unknown family: the smallest multiple, checked again by the worker
            pass
    return out


async def _image_in(state: ServerState, data: bytes, multiple: int, what: str = "image") -> torch.Tensor:
    read = payloads.read_image
    return await asyncio.to_thread(read, data, state.settings.max_pixels, state.tmpdir, what, multiple)


def _work(image: torch.Tensor, passes: int, multiple: int) -> int:
    """Padded pixels x forward passes of work on ``image`` (3, H, W)."""
    return padded(int(image.shape[-2]), multiple) * padded(int(image.shape[-1]), multiple) * passes


async def _encode_image_out(image: torch.Tensor, fmt: str) -> tuple[bytes, str]:
    return await asyncio.to_thread(payloads.image_bytes, image, fmt)


# --- library -----------------------------------------------------------------------------------------------------
@router.get("/health", tags=["server"])
async def health(request: Request) -> dict[str, Any]:
    """Liveness and load: queue length, loaded models, batching counters."""
    state = state_of(request)
    st = state.scheduler.stats
    return {
        "status": "ok",
        "version": vaekit.__version__,
        "device": str(state.device),
        "selected": state.selected,
        "queue": state.scheduler.queued,
        "max_queue": state.settings.max_queue,
        "loaded": [vars(m) for m in state.models.loaded()],
        "stats": vars(st) | {"forward_calls": state.engine.forward_calls, "model_loads": state.models.loads},
        "uptime_s": round(time.time() - state.started, 3),
        "limits": {
            "max_pixels": state.settings.max_pixels,
            "max_request_pixels": state.settings.request_pixels,
            "max_body_bytes": state.settings.max_body_bytes,
            "max_batch_items": state.settings.max_batch_items,
            "max_interpolation_steps": state.settings.max_interpolation_steps,
            "request_timeout_s": state.settings.request_timeout_s,
        },
        "streams": state.streams,
    }


@router.get("/vaes", tags=["library"])
async def list_vaes(request: Request) -> dict[str, Any]:
    """The library: every VAE with its family and hash, which one is selected, which are loaded."""
    state = state_of(request)
    entries = await asyncio.to_thread(state.catalog.refresh)
    loaded = {m.name for m in state.models.loaded()}
    return {
        "selected": state.selected,
        "vaes": [e.to_dict() | {"loaded": e.id in loaded} for e in entries],
        "warnings": state.catalog.warnings,
    }


class SelectBody(BaseModel):
    """Body of POST /vaes/select."""

    vae: str = Field(min_length=1, max_length=512, pattern=r"\S", description="VAE id, name or hash prefix")


@router.post("/vaes/select", tags=["library"])
async def select_vae(request: Request, body: SelectBody) -> dict[str, Any]:
    """Select the VAE used by requests that name none (like a web UI's SD VAE setting)."""
    state = state_of(request)
    entry = await state.entry(body.vae)
    state.select(entry)
    return {"selected": entry.id, "vae": entry.to_dict()}


# --- encode / decode ---------------------------------------------------------------------------------------------
@router.post("/encode", tags=["codec"], openapi_extra=_upload_schema("file"))
async def encode(
    request: Request,
    vae: VaeQuery = None,
    precision: PrecisionQuery = None,
    tiling: TilingQuery = None,
    format: Annotated[str, Query(description="safetensors, json (base64 float32) or raw")] = "safetensors",
) -> Response:
    """An image (raw body or multipart ``file``) -> its latents: a vaekit latent file, JSON, or raw float32."""
    started = time.perf_counter()
    state = state_of(request)
    fmt = payloads.output_format(format, ("safetensors", "json", "raw"))
    prec, tile = state.precision(precision), state.tiling(tiling)
    entry = await state.entry(vae)
    (data,) = await upload(request, "file")
    image = await _image_in(state, data, downscale(entry))
    state.admit(entry, prec, _work(image, 1, downscale(entry)))
    result = await state.run("encode", entry, prec, tile, image, tuple(image.shape), request)
    assert result.latent is not None and result.image_size is not None and result.padding is not None
    headers = _headers(entry, result, started)
    latent = result.latent.unsqueeze(0)
    headers["X-Latent-Shape"] = ",".join(str(d) for d in latent.shape)
    if fmt == "json":
        return JSONResponse(
            {
                "vae": entry.id,
                "vae_sha256": entry.sha256,
                "family": result.family,
                "shape": list(latent.shape),
                "dtype": "float32",
                "image_size": list(result.image_size),
                "padding": list(result.padding),
                "latents": payloads.tensor_b64(latent),
            },
            headers=headers,
        )
    if fmt == "raw":
        headers["X-Latent-Dtype"] = "float32"
        body = latent.contiguous().numpy().astype("<f4").tobytes()
        return Response(body, media_type=payloads.RAW_MEDIA, headers=headers)
    body = await asyncio.to_thread(
        payloads.latents_file_bytes,
        state.tmpdir,
        latent,
        result.vae,
        result.image_size,
        result.padding,
        uuid.uuid4().hex,
    )
    headers["Content-Disposition"] = 'attachment; filename="latents.safetensors"'
    return Response(body, media_type=payloads.SAFETENSORS_MEDIA, headers=headers)


def _check_latents(state: ServerState, entry: CatalogEntry, lat: payloads.LatentsIn, force: bool) -> None:
    z = lat.latents
    if z.ndim != 4:
        raise BadInputError(f"latents must be (N, C, h, w) or (C, h, w), got shape {tuple(z.shape)}")
    n, c, h, w = z.shape
    if n == 0 or h == 0 or w == 0:
        raise BadInputError(f"empty latents of shape {tuple(z.shape)}")
    if n > state.settings.max_batch_items:
        raise payloads.PayloadTooLargeError(f"{n} latents in one request; the cap is {state.settings.max_batch_items}")
    want = entry.entry.latent_channels
    if c != want:
        raise BadInputError(
            f"latents have {c} channels but the {entry.entry.family} VAE {entry.id!r} takes {want}: "
            "they were made by a VAE of another family"
        )
    f = downscale(entry)
    pixels = h * w * f**2
    if pixels > state.settings.max_pixels:
        raise payloads.PayloadTooLargeError(
            f"latents of {w}x{h} decode to {w * f}x{h * f} = {pixels} pixels, over the "
            f"server's cap of {state.settings.max_pixels}"
        )
    if not bool(torch.isfinite(z).all()):
        raise BadInputError("latents contain NaN or infinite values")
    fam = entry.entry.family
    if lat.family and not force and lat.family != fam and "custom" not in (lat.family, fam):
        raise BadInputError(
            f"these latents were made by a {lat.family} VAE and {entry.id!r} is {fam} (another latent scaling); "
            "pass force=true to decode them anyway"
        )


async def _latents_in(request: Request) -> payloads.LatentsIn:
    shape = request.headers.get("x-latent-shape")
    (data,) = await upload(request, "file")
    if not data:
        raise BadInputError("latents: empty upload")
    if shape is not None:
        return await asyncio.to_thread(payloads.read_raw_latents, data, shape, request.headers.get("x-latent-dtype"))
    return await asyncio.to_thread(payloads.read_safetensors_latents, data)


@router.post(
    "/decode",
    tags=["codec"],
    openapi_extra=_upload_schema("file", raw_types=(payloads.SAFETENSORS_MEDIA, payloads.RAW_MEDIA)),
)
async def decode(
    request: Request,
    vae: VaeQuery = None,
    precision: PrecisionQuery = None,
    tiling: TilingQuery = None,
    format: Annotated[str, Query(description="png, jpeg, webp, or raw (float32 N,3,H,W)")] = "png",
    force: Annotated[bool, Query(description="decode latents made by a VAE of another family")] = False,
) -> Response:
    """Latents (safetensors bytes, or raw float16/float32 with ``X-Latent-Shape``/``X-Latent-Dtype``) -> image."""
    started = time.perf_counter()
    state = state_of(request)
    fmt = payloads.output_format(format, ("png", "jpeg", "webp", "raw"))
    prec, tile = state.precision(precision), state.tiling(tiling)
    entry = await state.entry(vae)
    lat = await _latents_in(request)
    _check_latents(state, entry, lat, force)
    n = lat.latents.shape[0]
    if n > 1 and fmt != "raw":
        raise BadInputError(f"{n} latents decode to {n} images: use format=raw, or send one latent per request")
    items = [
        DecodeItem(lat.latents[i], lat.image_sizes[i], lat.paddings[i])
        for i in range(n)  # type: ignore[arg-type]
    ]
    shape = tuple(lat.latents.shape[1:])
    state.admit(entry, prec, n * shape[-2] * shape[-1] * downscale(entry) ** 2)
    results = await asyncio.gather(*(state.run("decode", entry, prec, tile, it, shape, request) for it in items))
    headers = _headers(entry, results[0], started)
    if fmt == "raw":
        images = torch.stack([r.image for r in results])  # type: ignore[misc]
        headers |= {"X-Image-Shape": ",".join(str(d) for d in images.shape), "X-Image-Dtype": "float32"}
        return Response(images.numpy().astype("<f4").tobytes(), media_type=payloads.RAW_MEDIA, headers=headers)
    assert results[0].image is not None
    body, media = await _encode_image_out(results[0].image, fmt)
    return Response(body, media_type=media, headers=headers)


# --- round trip and comparison -----------------------------------------------------------------------------------
@router.post("/roundtrip", tags=["codec"], openapi_extra=_upload_schema("file"))
async def roundtrip(
    request: Request,
    vae: VaeQuery = None,
    precision: PrecisionQuery = None,
    tiling: TilingQuery = None,
    format: Annotated[str, Query(description="png, jpeg, webp, or json (images as data URLs + metrics)")] = "png",
) -> Response:
    """An image -> encode -> decode: the reconstruction (PSNR/SSIM in headers), or JSON with the difference image."""
    started = time.perf_counter()
    state = state_of(request)
    fmt = payloads.output_format(format, ("png", "jpeg", "webp", "json"))
    prec, tile = state.precision(precision), state.tiling(tiling)
    entry = await state.entry(vae)
    (data,) = await upload(request, "file")
    image = await _image_in(state, data, downscale(entry))
    state.admit(entry, prec, _work(image, 2, downscale(entry)))
    result = await state.run("roundtrip", entry, prec, tile, image, tuple(image.shape), request)
    assert result.image is not None and result.latent is not None
    headers = _headers(entry, result, started)
    if fmt != "json":  # the image, with the two headline metrics in headers (the full set costs more than a decode)
        psnr, ssim = await asyncio.to_thread(headline_metrics, image, result.image)
        headers |= {"X-Vaekit-PSNR": f"{psnr:.4f}", "X-Vaekit-SSIM": "n/a" if ssim is None else f"{ssim:.6f}"}
        body, media = await _encode_image_out(result.image, fmt)
        return Response(body, media_type=media, headers=headers)
    metrics = await asyncio.to_thread(image_metrics, image, result.image)
    ssim = metrics["ssim"]
    headers |= {"X-Vaekit-PSNR": f"{metrics['psnr']:.4f}", "X-Vaekit-SSIM": "n/a" if ssim is None else f"{ssim:.6f}"}

    def views() -> dict[str, str]:
        return {
            "reconstruction": payloads.image_data_url(result.image),  # type: ignore[arg-type]
            "difference": payloads.image_data_url(difference_image(image, result.image)),  # type: ignore[arg-type]
        }

    images = await asyncio.to_thread(views)
    return JSONResponse(
        {
            "vae": entry.id,
            "family": result.family,
            "dtype": result.dtype,
            "image_size": [image.shape[2], image.shape[1]],
            "latent_shape": list(result.latent.shape),
            "metrics": metrics,
            "notes": result.notes,
            "seconds": round(time.perf_counter() - started, 4),
            "compute_seconds": round(result.seconds, 4),
            "images": images,
        },
        headers=headers,
    )


@router.post("/compare", tags=["codec"], openapi_extra=_upload_schema("file"))
async def compare(
    request: Request,
    vaes: Annotated[
        str | None, Query(description="comma-separated VAE names (default: every VAE in the library)")
    ] = None,
    precision: PrecisionQuery = None,
    tiling: TilingQuery = None,
    images: Annotated[bool, Query(description="include each reconstruction as a PNG data URL")] = False,
) -> dict[str, Any]:
    """Round-trip one image through several VAEs and report each one's metrics, best first.

    ``seconds`` is each VAE's compute time (its share of the forward passes), without queueing or model loading;
    ``best`` is the VAE with the strictly highest PSNR, or null when the top PSNRs tie (e.g. identical weights).
    """
    state = state_of(request)
    prec, tile = state.precision(precision), state.tiling(tiling)
    if vaes:
        names = [v.strip() for v in vaes.split(",") if v.strip()]
        entries = [await state.entry(n) for n in names]
    else:
        entries = await asyncio.to_thread(state.catalog.refresh)
    if not entries:
        raise BadInputError("no VAEs to compare: name some with vaes=a,b or add files to the library")
    if len(entries) > 8:
        raise BadInputError(f"{len(entries)} VAEs in one comparison; the cap is 8")
    (data,) = await upload(request, "file")
    unique = list({e.id: e for e in entries}.values())
    image = await _image_in(state, data, downscale(*unique))
    for entry in unique:
        state.admit(entry, prec, _work(image, 2, downscale(*unique)) * len(unique))

    async def one(entry: CatalogEntry) -> dict[str, Any]:
        result = await state.run("roundtrip", entry, prec, tile, image, tuple(image.shape), request)
        assert result.image is not None
        metrics = await asyncio.to_thread(image_metrics, image, result.image)
        row = {
            "vae": entry.id,
            "family": result.family,
            "sha256": entry.sha256,
            "dtype": result.dtype,
            **metrics,
            "seconds": round(result.seconds, 4),
            "notes": result.notes,
        }
        if images:
            row["image"] = await asyncio.to_thread(payloads.image_data_url, result.image)
        return row

    rows = await asyncio.gather(*(one(e) for e in unique))
    rows = sorted(rows, key=lambda r: -r["psnr"])
    best = rows[0]["vae"] if len(rows) == 1 or rows[0]["psnr"] > rows[1]["psnr"] + 1e-6 else None
    return {
        "image_size": [image.shape[2], image.shape[1]],
        "metric_source": "vaekit.eval.metrics",
        "results": rows,
        "best": best,
        "tied": [r["vae"] for r in rows if r["psnr"] >= rows[0]["psnr"] - 1e-6] if best is None else [],
    }


# --- latent views ------------------------------------------------------------------------------------------------
@router.post("/latents/channels", tags=["latent"], openapi_extra=_upload_schema("file"))
async def latent_channels(
    request: Request, vae: VaeQuery = None, precision: PrecisionQuery = None, tiling: TilingQuery = None
) -> dict[str, Any]:
    """Encode an image and show each latent channel as a normalised greyscale image with its statistics."""
    state = state_of(request)
    prec, tile = state.precision(precision), state.tiling(tiling)
    entry = await state.entry(vae)
    (data,) = await upload(request, "file")
    image = await _image_in(state, data, downscale(entry))
    state.admit(entry, prec, _work(image, 1, downscale(entry)))
    result = await state.run("encode", entry, prec, tile, image, tuple(image.shape), request)
    assert result.latent is not None

    def render() -> list[dict[str, Any]]:
        return [stats | {"image": payloads.image_data_url(img)} for img, stats in channel_images(result.latent, 4)]

    return {
        "vae": entry.id,
        "family": result.family,
        "shape": list(result.latent.shape),
        "channels": await asyncio.to_thread(render),
    }


@router.post("/interpolate", tags=["latent"], openapi_extra=_upload_schema("a", "b", raw_types=()))
async def interpolate(
    request: Request,
    vae: VaeQuery = None,
    precision: PrecisionQuery = None,
    tiling: TilingQuery = None,
    steps: Annotated[int, Query(ge=2, description="frames including both ends")] = 8,
    method: Annotated[str, Query(description="slerp or lerp")] = "slerp",
    resize: Annotated[bool, Query(description="resize image b to a's size instead of refusing")] = False,
) -> StreamingResponse:
    """Two images (multipart ``a`` and ``b``) -> frames between their latents, streamed as NDJSON progress events."""
    state = state_of(request)
    prec, tile = state.precision(precision), state.tiling(tiling)
    if steps > state.settings.max_interpolation_steps:
        raise BadInputError(f"steps={steps} is over the cap of {state.settings.max_interpolation_steps}")
    if method not in METHODS:
        raise BadInputError(f"unknown interpolation {method!r}: use slerp or lerp")
    entry = await state.entry(vae)
    data_a, data_b = await upload(request, "a", "b")
    img_a = await _image_in(state, data_a, downscale(entry), "image a")
    img_b = await _image_in(state, data_b, downscale(entry), "image b")
    if img_a.shape != img_b.shape and not resize:
        raise BadInputError(
            f"images a and b differ in size ({img_a.shape[2]}x{img_a.shape[1]} vs {img_b.shape[2]}x{img_b.shape[1]}): "
            "send resize=true to resize b to a's size, or two images of one size"
        )
    img_b = match_size(img_a, img_b, resize)
    shape = tuple(img_a.shape)
    state.admit(entry, prec, _work(img_a, 2 + steps, downscale(entry)))  # two encodes, then one decode per frame
    state.check_stream_room()
    enc_a, enc_b = await asyncio.gather(
        *(state.run("encode", entry, prec, tile, im, shape, request) for im in (img_a, img_b))
    )
    frames = interpolate_latents(enc_a.latent, enc_b.latent, steps, method)  # type: ignore[arg-type]
    started = time.perf_counter()
    window = state.stream_window  # a stream's fair share of the queue: one batch of frames at a time

    async def events() -> AsyncIterator[bytes]:
        state.streams += 1
        try:
            async with contextlib.aclosing(frame_events()) as inner:
                async for event in inner:
                    yield event
        finally:
            state.streams -= 1

    async def frame_events() -> AsyncIterator[bytes]:
        yield _event({"event": "start", "total": steps, "vae": entry.id, "latent_shape": list(frames.shape[1:])})

        async def frame(i: int) -> tuple[int, WorkResult]:
            item = DecodeItem(frames[i], enc_a.image_size, enc_a.padding)
            result = await state.run("decode", entry, prec, tile, item, tuple(frames.shape[1:]), admitted=True)
            return i, result

        pending: set[asyncio.Future[Any]] = set()
        gone = disconnect_watch(request)
        next_frame = done = 0
        try:
            while done < steps:
                while next_frame < steps and len(pending) < window:  # the stream's next frames join the queue's end
                    pending.add(asyncio.ensure_future(frame(next_frame)))
                    next_frame += 1
                finished, _ = await asyncio.wait(pending | {gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in finished:
                    return  # the client went away: the finally clause abandons its frames
                pending -= finished
                for task in finished:
                    i, result = task.result()
                    done += 1
                    url = await asyncio.to_thread(payloads.image_data_url, result.image)
                    yield _event({"event": "frame", "index": i, "done": done, "total": steps, "image": url})
            yield _event({"event": "done", "seconds": round(time.perf_counter() - started, 4)})
        except VaekitError as e:  # the status line is sent: report the failure in the stream
            yield _event({"event": "error", "error": str(e) or type(e).__name__})
        except Exception as e:
            log.error(
                "interpolation stream failed: %s: %s", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else ""
            )
            yield _event({"event": "error", "error": "internal error while decoding the frames (see the server's log)"})
        finally:  # a client that went away leaves nothing queued or running for it
            for t in pending:
                t.cancel()

    return StreamingResponse(events(), media_type="application/x-ndjson", headers=_headers(entry, None, started))


def _event(data: dict[str, Any]) -> bytes:
    return (json.dumps(data) + "\n").encode("utf-8")
