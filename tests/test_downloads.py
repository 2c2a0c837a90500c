"""Downloads under torchrun: local rank 0 fetches, the other ranks wait and read its files.

Each test starts from an empty cache or data folder and runs the real trainer with 2 processes.
Only the internet is replaced: a local HTTP server holds the files, and a sitecustomize.py in
the workers points torchvision's published addresses at it. As the server cannot hold the
published files, each stand-in file is published with its own checksum (the file name's sha256
prefix for weights, the md5 for FashionMNIST), so torch.hub's and torchvision's checks run on
what is served. The same sitecustomize watches, through an audit hook (which changes nothing),
every URL a worker requests and every file it opens in the watched folders, one log line each.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision

from fmdist.data import synthetic_images

from helpers import CONFIGS, TINY_SYNTHETIC_RUN, read_history, train, write_idx

PUBLISHED_RESNET18_FILE = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

SITECUSTOMIZE = '''
"""The internet, as fmdist's worker processes see it in tests/test_downloads.py."""
import json
import os
import sys


def _install():
    settings_file = os.environ.get("FMDIST_TEST_NETWORK")
    if not settings_file or "LOCAL_RANK" not in os.environ:  # torchrun's own process downloads nothing
        return
    with open(settings_file) as f:
        settings = json.load(f)
    from torchvision.datasets import FashionMNIST
    from torchvision.models import ResNet18_Weights

    ResNet18_Weights.IMAGENET1K_V1.value.url = settings["weights_url"]
    FashionMNIST.mirrors = [settings["mirror"]]
    FashionMNIST.resources = [tuple(resource) for resource in settings["resources"]]
    who = f"{os.environ['LOCAL_RANK']} {os.environ['RANK']}"
    watched = tuple(settings["watched"])

    def record(kind, target):
        fd = os.open(settings["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # one write per line: no interleaving
        try:
            os.write(fd, f"{who} {kind} {target}\\n".encode())
        finally:
            os.close(fd)

    def observe(event, args):
        if event == "urllib.Request":
            record("request", args[0])
        elif event == "open" and isinstance(args[0], str) and args[0].startswith(watched) and args[1]:
            record("write" if any(c in args[1] for c in "wax+") else "read", args[0])

    sys.addaudithook(observe)


_install()
'''


@dataclass(frozen=True)
class Event:
    local_rank: int
    rank: int
    kind: str  # request, read or write
    target: str  # a URL or a file path


def read_events(log: Path) -> list[Event]:
    events = []
    for line in log.read_text().splitlines():
        local_rank, rank, kind, target = line.split(" ", 3)
        events.append(Event(int(local_rank), int(rank), kind, target))
    return events


@dataclass(frozen=True)
class Served:
    path: str
    redirect_probe: bool  # torchvision asks each URL for redirects (a GET marked "Method: HEAD") before fetching it


class FileServer:
    """An HTTP server on 127.0.0.1 serving bytes by path and keeping a list of the requests it received."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[Served] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(Served(self.path, self.headers.get("Method") == "HEAD"))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the redirect probe reads only the headers
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def requests_for(self, path: str) -> list[Served]:
        return [r for r in self.requests if r.path == path]


@pytest.fixture
def file_server():
    server = FileServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def fake_network_env(tmp_path: Path, server: FileServer, watched: list[Path], weights_file: str = "none.pth", **more):
    """The environment of a launch whose workers see `server` as torchvision's download site."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    settings = {
        "weights_url": f"{server.url}/models/{weights_file}",
        "mirror": f"{server.url}/fashion-mnist/",
        "resources": [],
        "watched": [str(folder) for folder in watched],
        "log": str(tmp_path / "network.log"),
        **more,
    }
    (tmp_path / "network.json").write_text(json.dumps(settings))
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "FMDIST_TEST_NETWORK": str(tmp_path / "network.json"),
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "no_proxy": "127.0.0.1",  # the local server only; anything else still meets the closed proxy
    }


def stand_in_resnet18() -> tuple[dict[str, torch.Tensor], bytes]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return state, buffer.getvalue()


def by_rank(events: list[Event], kind: str, targets) -> dict[int, list[str]]:
    """The `kind` events on `targets`, per local rank, in the order they happened."""
    found: dict[int, list[str]] = {}
    for event in events:
        if event.kind == kind and event.target in targets:
            found.setdefault(event.local_rank, []).append(event.target)
    return found


def position_of_first(events: list[Event], kind: str, local_rank: int) -> int:
    return next(i for i, e in enumerate(events) if e.kind == kind and e.local_rank == local_rank)


def position_of_last(events: list[Event], kind: str, local_rank: int) -> int:
    return max(i for i, e in enumerate(events) if e.kind == kind and e.local_rank == local_rank)


def test_named_weights_are_downloaded_once_by_local_rank_zero_and_every_rank_trains_from_the_cached_file(
    tmp_path, file_server
):
    state, served = stand_in_resnet18()
    weights_file = f"resnet18-{hashlib.sha256(served).hexdigest()[:8]}.pth"
    file_server.files[f"/models/{weights_file}"] = served
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    env = fake_network_env(tmp_path, file_server, watched=[checkpoints], weights_file=weights_file)
    out = tmp_path / "frozen"

    result = train(
        tmp_path,
        "--config",
        str(CONFIGS / "frozen.yaml"),
        *TINY_SYNTHETIC_RUN,
        "model.weights=IMAGENET1K_V1",
        f"output_dir={out}",
        nproc=2,
        env=env,
    )

    cached = checkpoints / weights_file
    events = read_events(tmp_path / "network.log")
    assert [e for e in events if e.kind == "request"] == [
        Event(0, 0, "request", f"{file_server.url}/models/{weights_file}")
    ]
    assert file_server.requests == [Served(f"/models/{weights_file}", redirect_probe=False)]
    writes = [e for e in events if e.kind == "write"]
    assert len(writes) == 1 and (writes[0].local_rank, writes[0].rank) == (0, 0)  # torch.hub's .partial file
    assert cached.read_bytes() == served
    assert by_rank(events, "read", {str(cached)}) == {0: [str(cached)], 1: [str(cached)]}
    assert position_of_first(events, "read", local_rank=1) > position_of_last(events, "write", local_rank=0)
    assert "fmdist: frozen resnet18, 2 process(es) on cpu" in result.stdout
    assert f"fmdist: starting weights IMAGENET1K_V1: {cached}" in result.stdout
    assert read_history(out)[0]["val_count"] == 64
    # The backbone stays frozen, so the trained model still holds the downloaded weights.
    trained = torch.load(out / "model.pt", weights_only=True)
    for key in ("layer1.0.conv1.weight", "layer4.1.conv2.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(trained[key], state[key]), key


def test_a_download_failing_its_hash_check_stops_every_rank_and_leaves_nothing_in_the_cache(tmp_path, file_server):
    _, served = stand_in_resnet18()  # not the published file, so not of its sha256 prefix
    file_server.files[f"/models/{PUBLISHED_RESNET18_FILE}"] = served
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    env = fake_network_env(tmp_path, file_server, watched=[checkpoints], weights_file=PUBLISHED_RESNET18_FILE)

    result = train(
        tmp_path,
        "--config",
        str(CONFIGS / "frozen.yaml"),
        *TINY_SYNTHETIC_RUN,
        "model.weights=IMAGENET1K_V1",
        f"output_dir={tmp_path / 'x'}",
        nproc=2,
        env=env,
        check=False,
    )

    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fmdist: error:")]
    published_prefix = PUBLISHED_RESNET18_FILE.removesuffix(".pth").rsplit("-", 1)[1]
    assert len(errors) == 1 and f'invalid hash value (expected "{published_prefix}"' in errors[0], result.stderr
    requests = [e for e in read_events(tmp_path / "network.log") if e.kind == "request"]
    assert [(e.local_rank, e.rank) for e in requests] == [(0, 0)]
    assert len(file_server.requests) == 1
    assert list(checkpoints.iterdir()) == []


def test_fashion_mnist_is_downloaded_once_by_local_rank_zero_and_every_rank_trains_on_it(tmp_path, file_server):
    served_folder = tmp_path / "served"
    served_folder.mkdir()
    splits = {"train": synthetic_images(256, 10, 1, "train"), "t10k": synthetic_images(64, 10, 1, "test")}
    for prefix, (images, labels) in splits.items():
        write_idx(served_folder / f"{prefix}-images-idx3-ubyte.gz", images.numpy(), compress=True)
        write_idx(served_folder / f"{prefix}-labels-idx1-ubyte.gz", labels.numpy(), compress=True)
    resources = []
    for name in IDX_FILES:
        archive = (served_folder / f"{name}.gz").read_bytes()
        file_server.files[f"/fashion-mnist/{name}.gz"] = archive
        resources.append((f"{name}.gz", hashlib.md5(archive).hexdigest()))
    root = tmp_path / "data"
    raw = root / "FashionMNIST" / "raw"
    env = fake_network_env(tmp_path, file_server, watched=[raw], resources=resources)
    out = tmp_path / "tv"

    result = train(
        tmp_path,
        "--config",
        str(CONFIGS / "scratch.yaml"),
        "data.source=torchvision",
        "data.download=true",
        f"data.root={root}",
        "model.width=8",
        "epochs=1",
        "batch_size=32",
        f"output_dir={out}",
        nproc=2,
        env=env,
    )

    events = read_events(tmp_path / "network.log")
    requests = [e for e in events if e.kind == "request"]
    assert {(e.local_rank, e.rank) for e in requests} == {(0, 0)}
    assert len(requests) == len(file_server.requests)
    for name in IDX_FILES:
        path = f"/fashion-mnist/{name}.gz"
        assert [r for r in file_server.requests_for(path) if not r.redirect_probe] == [Served(path, False)], path
        assert (raw / f"{name}.gz").read_bytes() == file_server.files[path]
        assert (raw / name).read_bytes() == gzip.decompress(file_server.files[path])
    downloaded_and_extracted = {str(raw / f"{name}{suffix}") for name in IDX_FILES for suffix in ("", ".gz")}
    assert Counter(e.target for e in events if e.kind == "write") == Counter(downloaded_and_extracted)
    assert {e.local_rank for e in events if e.kind == "write"} == {0}
    extracted = {str(raw / name) for name in IDX_FILES}
    for local_rank, read in by_rank(events, "read", extracted).items():
        assert set(read) == extracted, f"local rank {local_rank} read {read}"
    assert set(by_rank(events, "read", extracted)) == {0, 1}
    assert position_of_first(events, "read", local_rank=1) > position_of_last(events, "write", local_rank=0)
    assert (
        f"fmdist: data torchvision: 256 training images from {root / 'FashionMNIST'}, "
        f"64 test images from {root / 'FashionMNIST'}" in result.stdout
    )
    assert read_history(out)[0]["val_count"] == 64
