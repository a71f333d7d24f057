"""python -m ldm.webui: a Gradio web UI over the Pipeline API (txt2img, img2img, inpainting, outpainting, LoRA and
embedding pickers, ControlNet, PNG info, models, a diffusion explorer), and AUTOMATIC1111's REST API (ldm.api).

    python -m ldm.webui                                   # the embedded model, http://127.0.0.1:7860
    python -m ldm.webui --ckpt v1-5-pruned-emaonly.safetensors --models-dir models --port 7861
    python -m ldm.webui --api                             # the page and /sdapi/v1 (OpenAPI at /docs)
    python -m ldm.webui --nowebui --api-auth me:secret    # the API alone, HTTP Basic auth

It generates through ldm.outputs.make_images, as txt2img.py does: the same parameters make the same image, written
the same way (numbered PNGs with their parameters, in --outdir). It binds 127.0.0.1 unless --listen, never opens a
share link, sends no analytics, and serves no file but those in --outdir and Gradio's upload cache. One generation
runs at a time (Gradio's queue); bad input is the CLI's one-line message in the page.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ldm import LdmError, cli

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m ldm.webui", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, help="the model to start with (default: the embedded model)")
    p.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models"),
        help="checkpoints to switch between (SD v1 files, diffusers folders, ours), with Lora/, embeddings/ and "
        "ControlNet/ inside (default: models)",
    )
    p.add_argument("--outdir", type=Path, default=Path("outputs/txt2img-samples"), help="where the PNGs go")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (every network interface), not 127.0.0.1")
    p.add_argument("--device", help="cpu, cuda, mps... (default: cuda when there is one, else cpu)")
    p.add_argument(
        "--taesd", type=Path, metavar="PATH", help="decode (and preview) with this TAESD file or folder, as txt2img.py"
    )
    p.add_argument("--api", action="store_true", help="also serve AUTOMATIC1111's REST API, /sdapi/v1 (docs: /docs)")
    p.add_argument("--nowebui", action="store_true", help="serve the REST API alone, without the page")
    p.add_argument(
        "--api-auth", type=users, default={}, metavar="USER:PASS[,USER:PASS...]", help="HTTP Basic auth on the REST API"
    )
    return p.parse_args(argv)


def users(value: str) -> dict[str, str]:
    """--api-auth USER:PASS[,USER2:PASS2...] as {user: password}."""
    pairs = [item.split(":", 1) for item in value.split(",")]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise argparse.ArgumentTypeError(f"takes USER:PASS[,USER2:PASS2...], got '{value}'")
    return dict(pairs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: serve(args))


def serve(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise LdmError("the web UI needs gradio: pip install 'ldm[webui]'") from None
    from ldm.webui_app import CSS, Session, build  # gradio and torch: seconds

    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen and (args.api or args.nowebui) and not args.api_auth:
        print("warning: the API listens on every network interface without --api-auth", file=sys.stderr)
    session = Session(args)
    if args.api or args.nowebui:
        return serve_api(args, session, host, None if args.nowebui else build(session))
    demo = build(session)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=args.port,
        share=False,
        ssr_mode=False,
        allowed_paths=[str(args.outdir.resolve())],
        blocked_paths=[str(args.models_dir.resolve())],
        footer_links=[],
        css=CSS,
        quiet=True,  # Gradio's own lines tell how to make a share link, which this page never makes
        prevent_thread_lock=True,
    )
    print(f"* Running on local URL:  http://{host}:{args.port}", flush=True)
    demo.block_thread()
    return 0


def serve_api(args, session, host: str, demo) -> int:
    """The REST API (ldm.api) with uvicorn, the page (demo, None for --nowebui) mounted at / beside it."""
    import gradio
    import uvicorn

    from ldm.api import create_app
    from ldm.webui_app import CSS

    app = create_app(session, args.api_auth)
    if demo is not None:
        demo.queue(default_concurrency_limit=1)
        app = gradio.mount_gradio_app(
            app,
            demo,
            "/",
            footer_links=[],
            allowed_paths=[str(args.outdir.resolve())],
            blocked_paths=[str(args.models_dir.resolve())],
            ssr_mode=False,
            css=CSS,
        )
    print(f"* Running on local URL:  http://{host}:{args.port}", flush=True)
    uvicorn.run(app, host=host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
