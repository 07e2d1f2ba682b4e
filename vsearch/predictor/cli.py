"""``vsearch serve embedder``, ``vsearch embed``, ``vsearch model init|info`` (and the search
service's commands, registered by ``search/cli.py``). Each handler is the entry point of its
process: it alone sets process-wide state (torch threads, PIL's pixel guard, KServe's argv)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from ..core.config import Flags
from ..core.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, image_files
from .limits import ServerLimits, add_server_flags, server_limits_from
from .model_dir import ARCHS, ModelDirError, default_model_dir, read_meta
from .preprocess import InvalidImage, Limits, set_decoder_pixel_limit, stack
from .runtimes import add_runtime_flag
from .search import cli as search_cli


def add_model_flags(f: Flags, *, required: bool = False) -> None:
    """Flags every command that loads a model shares."""
    f.add("--model-dir", default=None if required else str(default_model_dir()),
             help="model directory (save_pretrained layout + vsearch_model.json)")
    f.add("--device", default=None, help="torch device (cuda when present, else cpu)")
    f.add("--threads", default=None, type=int,
          help="CPU threads of the forward pass (torch's, or the ONNX Runtime / OpenVINO intra-op threads)")
    add_runtime_flag(f)
    f.add("--batch-size", default=32, type=int, help="forward-pass batch size")
    f.add("--max-pixels", default=DEFAULT_MAX_PIXELS, type=int, help="largest image accepted, in pixels")
    f.add("--max-image-bytes", default=DEFAULT_MAX_BYTES, type=int,
             help="largest image file accepted, in bytes")


def limits_from(args):
    """The image limits of the flags, with PIL's own guard raised to match (process-wide)."""
    set_decoder_pixel_limit(args.max_pixels)
    return Limits(max_bytes=args.max_image_bytes, max_pixels=args.max_pixels)


def register(sub) -> None:
    # serve: one sub-command per KServe model
    serve = sub.add_parser("serve", help="run a KServe model server")
    serve_sub = serve.add_subparsers(dest="model", metavar="MODEL", required=True)
    p = serve_sub.add_parser("embedder", help="image -> embedding (KServe V1 and V2)")
    f = Flags(p, "EMBEDDER")
    add_model_flags(f)
    f.add("--model-name", default="embedder", help="name in /v2/models/<name>")
    f.add("--http-port", default=8080, type=int, help="HTTP port")
    f.add("--max-batch", default=64, type=int, help="most images in one request")
    f.add("--max-queue", default=256, type=int,
          help="most images being decoded or waiting for the model; more: 503 with Retry-After")
    f.add("--max-body-bytes", default=ServerLimits.max_body_bytes, type=int,
          help="largest request body, bytes (counted as read, chunked bodies included): 413 over it")
    add_server_flags(f)
    f.add("--api-key", default=None, secret=True,
          help="require this key (X-API-Key header or Bearer token) on every endpoint but health")
    p.set_defaults(handler=_serve_embedder)
    search_cli.register_serve(serve_sub)
    search_cli.register(sub)
    search_cli.register_experiment(sub)

    p = sub.add_parser("embed", help="embed image files offline into a .npy file")
    add_model_flags(Flags(p, "EMBED"))
    p.add_argument("--out", required=True, help="output .npy ([N, D] float32); the file names "
                   "go to <out>.paths.txt in the same order")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.set_defaults(handler=_embed)

    model = sub.add_parser("model", help="model directories")
    model_sub = model.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = model_sub.add_parser("init", help="write a random-initialised model directory")
    p.add_argument("--arch", required=True, choices=ARCHS, metavar="ARCH",
                   help=f"architecture: {', '.join(ARCHS)}")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None, help="model name (default: the arch)")
    p.add_argument("--version", default="0")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the arch's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_model_init)
    p = model_sub.add_parser("info", help="print a model directory's metadata")
    p.add_argument("model_dir")
    p.set_defaults(handler=_model_info)


def _serve_embedder(args) -> int:
    from .serving import hide_argv_from_kserve, run_model_server
    hide_argv_from_kserve()
    from .inference import set_torch_threads
    set_torch_threads(args.threads)
    from .embedder_server import REJECTED, EmbedderModel
    model = EmbedderModel(args.model_name, args.model_dir, max_batch=args.max_batch, device=args.device,
                          batch_size=args.batch_size, limits=limits_from(args), max_queue=args.max_queue,
                          runtime=args.runtime)
    limits = server_limits_from(args, max_body_bytes=args.max_body_bytes)
    # a full batch (an image and a crop box per row: about 6 JSON values each) always fits
    limits = dataclasses.replace(limits, max_json_values=max(limits.max_json_values, 8 * args.max_batch))
    run_model_server(model, http_port=args.http_port, add_routes=model.add_routes,
                     on_bad_request=REJECTED.labels("request").inc, limits=limits,
                     api_key=args.api_key or None, on_reject=lambda _status: REJECTED.labels("request").inc())
    return 0


def list_images(inputs) -> list[Path]:
    """Files given directly, plus image files found recursively in folders, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += image_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"no such file or folder: {path}")
    return files


def _embed(args) -> int:
    from tqdm import tqdm

    from .inference import Embedder, set_torch_threads

    files = list_images(args.inputs)
    if not files:
        print("no image files found", file=sys.stderr)
        return 1
    set_torch_threads(args.threads)
    emb = Embedder(args.model_dir, device=args.device, batch_size=args.batch_size, limits=limits_from(args),
                   runtime=args.runtime)
    vectors, kept, failed = [], [], []
    with tqdm(total=len(files), unit="img", desc="embed") as bar:
        for start in range(0, len(files), emb.batch_size):
            chunk = files[start:start + emb.batch_size]
            items = emb.try_preprocess([f.read_bytes() for f in chunk])
            good = []
            for f, item in zip(chunk, items):
                if isinstance(item, InvalidImage):
                    if args.strict:
                        raise SystemExit(f"{f}: {item}")
                    failed.append((f, item))
                else:
                    good.append(item)
                    kept.append(f)
            if good:
                vectors.append(emb.embed_arrays(stack(good)))
            bar.update(len(chunk))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, emb.dim), np.float32)
    np.save(out, matrix)
    Path(str(out) + ".paths.txt").write_text("".join(f"{f}\n" for f in kept))
    for f, exc in failed:
        print(f"skipped {f}: {exc}", file=sys.stderr)
    print(f"wrote {matrix.shape[0]} x {matrix.shape[1]} embeddings to {out} "
          f"({len(failed)} unreadable file(s) skipped)")
    return 1 if failed and not kept else 0


def _model_init(args) -> int:
    if args.image_size is not None and args.image_size < 16:
        print(f"vsearch model init: --image-size {args.image_size}: give at least 16 pixels", file=sys.stderr)
        return 2
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"vsearch model init: --out {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    from .zoo import init_model_dir
    meta = init_model_dir(args.arch, args.out, name=args.name, version=args.version,
                          image_size=args.image_size, seed=args.seed)
    print(f"wrote random-initialised {args.arch} ({meta.family}, {meta.embedding_dim}-d, "
          f"{meta.image_size}px) to {args.out}")
    return 0


def _model_info(args) -> int:
    try:
        meta = read_meta(args.model_dir)
    except ModelDirError as exc:
        print(f"vsearch model info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(meta.to_json(), indent=2))
    return 0

