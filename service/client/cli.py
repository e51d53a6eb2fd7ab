"""``sepconv-classify IMAGE... [--url URL] [--protocol v1|oip|grpc]``: classify images on a server.

Each IMAGE is a file or a folder (searched recursively for image files, in sorted order). Every
image is one request, sent by ``--concurrency`` threads, so a bad image fails alone and the rest
are still classified. Results print in argument order: one block per image, or with ``--json``
one JSON object per line (JSON Lines) on stdout; errors and the progress bar go to stderr.

Exit status: 0 every image classified, 1 some failed (each failure printed with the server's
message), 2 usage error (bad option or URL, no image found), 3 no server reachable at the URL.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TextIO

import orjson

from service.client.base import (
    Classification,
    Fatal,
    RequestFailed,
    Transport,
    Unreachable,
    with_retries,
)

OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
PROTOCOLS = ("v1", "oip", "grpc")
DEFAULT_HTTP_URL = "http://127.0.0.1:8000"
DEFAULT_GRPC_PORT = 8001
#: Extensions searched for in folders, with the Content-Type ``/v1`` sends them with. A file
#: named on the command line is sent whatever its name (the server sniffs unknown types).
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


class UsageError(Exception):
    pass


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sepconv-classify",
        description="Classify images on a sepconv-serve server (or any Open Inference Protocol "
        "server) and print each image's most probable labels.",
        epilog="Exit status: 0 all classified, 1 some images failed, 2 usage error, "
        "3 no server reachable.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    parser.add_argument(
        "--url",
        help=f"server address: http(s)://host:port[/prefix] for v1 and oip (default "
        f"{DEFAULT_HTTP_URL}); host:port or grpc://host:port for grpc (default "
        f"127.0.0.1:{DEFAULT_GRPC_PORT}). A grpc:// URL implies --protocol grpc",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="v1: POST /v1/classify (default); oip: Open Inference Protocol REST "
        "(/v2/models/NAME/infer); grpc: Open Inference Protocol over gRPC",
    )
    parser.add_argument(
        "-k", "--top-k", type=_positive(int), default=5, help="labels per image (default 5)"
    )
    parser.add_argument(
        "--model",
        help="model name (default: the server's; oip and grpc ask the server which it serves)",
    )
    parser.add_argument("--model-version", help="model version (default: the server's choice)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per image and line (JSON Lines), failures included",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive(int),
        default=4,
        help="requests in flight at once (default 4)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=30.0,
        help="seconds to wait for each answer (default 30)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="retries of an image the server refuses with Retry-After (429, 503; gRPC "
        "RESOURCE_EXHAUSTED, UNAVAILABLE), after the delay it asks for (default 3)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: for several images when a folder is given "
        "or stderr is a terminal)",
    )
    return parser


# --- inputs -----------------------------------------------------------------------------------


def collect_images(arguments: list[str]) -> tuple[list[Path], bool]:
    """The files to classify, in argument order (folders: recursively, sorted, hidden names
    and non-image extensions skipped), and whether a folder was given."""
    paths: list[Path] = []
    folders = False
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            folders = True
            paths.extend(
                sorted(
                    found
                    for found in path.rglob("*")
                    if found.suffix.lower() in IMAGE_TYPES
                    and not any(p.startswith(".") for p in found.relative_to(path).parts)
                    and found.is_file()
                )
            )
        elif path.exists():
            paths.append(path)
        else:
            raise UsageError(f"no such file or folder: {argument}")
    if not paths:
        raise UsageError(f"no image files found in {', '.join(arguments)}")
    return paths, folders


def endpoint(url: str | None, protocol: str | None) -> tuple[str, str]:
    """``(protocol, address)``: a URL for httpx, or ``host:port`` for a gRPC channel."""
    if protocol is None:
        protocol = "grpc" if url and url.startswith("grpc://") else "v1"
    if protocol == "grpc":
        target = (url or f"127.0.0.1:{DEFAULT_GRPC_PORT}").removeprefix("grpc://").rstrip("/")
        if "://" in target or "/" in target or not target:
            raise UsageError(f"--protocol grpc takes host:port or grpc://host:port, not {url!r}")
        host, _, port = target.rpartition(":")
        if not host or "]" in port:  # no port given (IPv6 "[::1]" alone ends in "]")
            target = f"{target}:{DEFAULT_GRPC_PORT}"
        elif not port.isdigit():
            raise UsageError(f"bad port in {url!r}")
        return protocol, target
    url = url or DEFAULT_HTTP_URL
    if "://" not in url:
        url = f"http://{url}"
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise UsageError(
            f"--protocol {protocol} takes an http(s)://host:port URL, not {url!r}"
            + (" (grpc:// URLs go with --protocol grpc)" if scheme == "grpc" else "")
        )
    return protocol, url.rstrip("/")


def make_transport(args: argparse.Namespace, protocol: str, address: str) -> Transport:
    options: dict[str, Any] = dict(
        timeout_s=args.timeout, top_k=args.top_k, model=args.model, version=args.model_version
    )
    if protocol == "grpc":
        from service.client.grpc_oip import GrpcTransport

        return GrpcTransport(address, **options)
    try:
        from service.client import rest
    except ImportError as exc:
        raise UsageError(
            f"{exc.name} is missing: pip install 'sepconv-serve[client]' for the HTTP protocols"
        ) from None
    kind = rest.V1Transport if protocol == "v1" else rest.OIPTransport
    return kind(address, concurrency=args.concurrency, **options)


# --- output -----------------------------------------------------------------------------------


class Output:
    """Results on stdout, failures on stderr (in JSON mode on stdout too), around a progress
    bar on stderr when there is one."""

    def __init__(self, as_json: bool, bar: Any = None) -> None:
        self.as_json = as_json
        self.bar = bar

    def _print(self, text: str, stream: TextIO) -> None:
        if self.bar is not None:
            self.bar.write(text, file=stream)  # clears the bar, prints, redraws it
        else:
            print(text, file=stream, flush=True)

    def result(self, path: Path, answer: Classification) -> None:
        if self.as_json:
            self._print(orjson.dumps({"file": str(path), **answer.document()}).decode(), sys.stdout)
            return
        width = max(len(p.label) for p in answer.predictions) if answer.predictions else 0
        lines = [str(path)]
        lines += [
            f"  {p.probability:.4f}  {p.label:<{width}}  (class {p.index})"
            for p in answer.predictions
        ]
        self._print("\n".join(lines), sys.stdout)

    def failure(self, path: Path, error: RequestFailed) -> None:
        if self.as_json:
            record = {"file": str(path), "error": error.document()}
            self._print(orjson.dumps(record).decode(), sys.stdout)
        else:
            self._print(f"{path}: error: {error}", sys.stderr)

    def note(self, text: str) -> None:
        self._print(f"sepconv-classify: {text}", sys.stderr)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_bar(total: int, wanted: bool | None, folders: bool) -> Any:
    if wanted is None:
        wanted = total > 1 and (folders or sys.stderr.isatty())
    if not wanted:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        print(
            "sepconv-classify: no progress bar: pip install 'sepconv-serve[client]' for tqdm",
            file=sys.stderr,
        )
        return None
    return tqdm(total=total, unit="img", desc="classifying", file=sys.stderr, dynamic_ncols=True)


# --- the run ----------------------------------------------------------------------------------


def classify_file(transport: Transport, path: Path, retries: int) -> Classification:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RequestFailed(f"cannot read the file: {exc.strerror or exc}") from None
    content_type = IMAGE_TYPES.get(path.suffix.lower())
    return with_retries(lambda: transport.classify(path.name, data, content_type), retries)


def classify_all(
    transport: Transport, paths: list[Path], args: argparse.Namespace, output: Output
) -> tuple[int, Classification | None]:
    """Classify every path; returns (failures, one answer). Results print in path order as soon
    as every earlier one is done. A :class:`Fatal` or :class:`Unreachable` stops the run."""
    failures, last = 0, None
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = [pool.submit(classify_file, transport, path, args.retries) for path in paths]
        pending: set[Future] = set(futures)
        printed = 0
        try:
            while printed < len(futures):
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                if output.bar is not None:
                    output.bar.update(len(done))
                while printed < len(futures) and futures[printed].done():
                    path, future = paths[printed], futures[printed]
                    try:
                        last = future.result()
                        output.result(path, last)
                    except (Fatal, Unreachable):
                        raise
                    except RequestFailed as exc:
                        failures += 1
                        output.failure(path, exc)
                    printed += 1
        finally:
            for future in pending:
                future.cancel()
    return failures, last


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must be >= 0")
    try:
        paths, folders = collect_images(args.images)
        protocol, address = endpoint(args.url, args.protocol)
        transport = make_transport(args, protocol, address)
    except UsageError as exc:
        parser.error(str(exc))  # exits with status 2
    output = Output(args.json)
    start = time.perf_counter()
    try:
        with_retries(transport.resolve_model, args.retries)
        output.bar = progress_bar(len(paths), args.progress, folders)
        failures, answer = classify_all(transport, paths, args, output)
    except Unreachable as exc:
        output.close_bar()
        output.note(f"{exc} (is the server running? check --url and --protocol)")
        return UNREACHABLE
    except RequestFailed as exc:  # Fatal, or model discovery failed
        output.close_bar()
        output.note(str(exc))
        return FAILED
    except KeyboardInterrupt:
        output.close_bar()
        output.note("interrupted")
        return 130
    finally:
        output.close_bar()
        transport.close()
    if len(paths) > 1:
        model = f" with {answer.model_name} version {answer.model_version}" if answer else ""
        output.note(
            f"classified {len(paths) - failures} of {len(paths)} images{model} in "
            f"{time.perf_counter() - start:.2f} s" + (f"; {failures} failed" if failures else "")
        )
    return FAILED if failures else OK
