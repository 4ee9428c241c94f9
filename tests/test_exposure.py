"""Exposure of the launched app: where it listens, which files a request can make it read, how
large an upload may be, and what it leaves on disk. Driven over HTTP (httpx, what gradio_client
uses underneath, for the raw payloads gradio_client would not send) and with gradio_client."""

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr
import httpx
import pytest
import torch
from helpers import STAND_IN_CLASSES, free_port, stand_in_app
from PIL import Image

import vitdemo.app
from vitdemo.app import common, models, train_tab, training
from vitdemo.engine import StepEvent, TrainingError

ROOT = Path(__file__).resolve().parent.parent
FILE_DATA = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def server_env(tmp_path_factory):
    """The app's folders in a private temporary directory, laid out as in production: the system
    temp directory (tempfile.tempdir) holds the app's folder and Gradio's upload cache."""
    root = tmp_path_factory.mktemp("exposure")
    tmp = root / "tmp"
    tmp.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(tmp))
        mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))  # read when components and the server are made
        stand_in_app(mp, tmp)
        yield tmp
    torch.set_num_threads(threads)


def launch(**kwargs) -> tuple[gr.Blocks, str]:
    demo = vitdemo.app.build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **kwargs, **vitdemo.app.launch_options())
    return demo, url


@pytest.fixture(scope="module")
def app(server_env):
    demo, url = launch(server_name="127.0.0.1", server_port=free_port())
    yield url
    demo.close()


def client_for(url, tmp_path):
    from gradio_client import Client

    return Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "downloads"))


def call(url: str, api: str, data: list) -> tuple[str, str]:
    """One call of a named endpoint through Gradio's HTTP API: (last event, its data)."""
    with httpx.Client(base_url=url, timeout=120) as http:
        response = http.post(f"/gradio_api/call/{api}", json={"data": data})
        if response.status_code != 200:
            return f"http {response.status_code}", response.text
        event, payload = None, None
        with http.stream("GET", f"/gradio_api/call/{api}/{response.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    payload = line.split(":", 1)[1].strip()
        return event, payload


def arguments(url: str, api: str, **given) -> list:
    """The endpoint's arguments: its defaults, with those `given` by parameter name."""
    with httpx.Client(base_url=url, timeout=60) as http:
        info = http.get("/gradio_api/info").json()["named_endpoints"][f"/{api}"]
    args = {p["parameter_name"]: p.get("parameter_default") for p in info["parameters"]}
    assert set(given) <= set(args), (set(given) - set(args), list(args))
    return list({**args, **given}.values())


def upload(url: str, path: Path) -> dict:
    """`path` sent as a user's upload: Gradio's file data for it, as the browser passes it on."""
    with httpx.Client(base_url=url, timeout=120) as http, open(path, "rb") as f:
        (stored,) = http.post("/gradio_api/upload", files={"files": (path.name, f)}).json()
    return {"path": stored, "orig_name": path.name, "meta": FILE_DATA}


def class_folder_zip(path: Path, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            for i in range(12):
                buf = io.BytesIO()
                Image.new("RGB", (size, size), tuple(max(0, c - 5 * i) for c in colour)).save(buf, format="PNG")
                zf.writestr(f"shapes/{name}/{i}.png", buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# Where the app listens
# ---------------------------------------------------------------------------------------------


def listeners(port: int) -> list[str]:
    """Addresses of the sockets listening on `port` (IPv4 and IPv6), from /proc/net."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # the kernel prints each 32-bit word in host order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found


def test_launch_options_leave_host_to_the_environment_and_never_share():
    options = vitdemo.app.launch_options()
    assert "server_name" not in options and "server_port" not in options  # GRADIO_SERVER_NAME / _PORT decide
    assert not options.get("share") and options["max_file_size"] == common.MAX_FILE_SIZE == "20mb"
    assert options["show_error"] is False  # tracebacks of unexpected errors stay in the server log


@pytest.mark.slow
@pytest.mark.parametrize("server_name, expected", [(None, "127.0.0.1"), ("127.0.0.2", "127.0.0.2")])
def test_app_py_listens_on_loopback_unless_told_otherwise(tmp_path, server_name, expected):
    """`python app.py`: without GRADIO_SERVER_NAME it listens on 127.0.0.1 only, never on all
    interfaces; with it, where it says (Gradio reads it when imported, hence a process of its own)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(tmp_path),
               OMP_NUM_THREADS="1", NO_PROXY="localhost,127.0.0.1,127.0.0.2", no_proxy="localhost,127.0.0.1,127.0.0.2")
    if server_name is not None:
        env["GRADIO_SERVER_NAME"] = server_name
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not listeners(port) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert listeners(port) == [expected]
        assert httpx.get(f"http://{expected}:{port}/", timeout=60).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()


# ---------------------------------------------------------------------------------------------
# No request makes the server read a file it names
# ---------------------------------------------------------------------------------------------


def path_payloads(path: Path) -> list:
    """`path` as a string and as Gradio file data, plainly, with '..' and as a file:// URL."""
    return [
        str(path),
        {"path": str(path), "meta": FILE_DATA},
        {"path": "../../../../../.." + str(path), "meta": FILE_DATA},
        {"path": str(path), "url": path.as_uri(), "orig_name": path.name, "meta": FILE_DATA},
    ]


@pytest.mark.slow
def test_classify_never_reads_a_server_path(app, server_env):
    # Real images the server can read: had any been read, it would have been classified.
    secrets = [server_env / "secret.png", ROOT / "docs" / "screenshots" / "classify.png"]
    Image.new("RGB", (32, 32), "red").save(secrets[0])
    assert secrets[1].is_file()
    # The same image, uploaded, is classified: the calls below differ by the image's path alone.
    event, data = call(app, "classify", arguments(app, "classify", image=upload(app, secrets[0])))
    assert event == "complete" and "confidences" in data, (event, data)

    payloads = [p for s in secrets for p in path_payloads(s)]
    payloads += ["/etc/passwd", "../../etc/passwd", {"path": "/etc/passwd", "meta": FILE_DATA}]
    for payload in payloads:
        event, data = call(app, "classify", arguments(app, "classify", image=payload))
        assert event == "error", (payload, event, data)
        assert "confidences" not in (data or ""), payload


@pytest.mark.slow
def test_training_never_reads_a_server_path(app, server_env, tmp_path):
    secret = class_folder_zip(server_env / "secret" / "data.zip")  # a valid training set on the server
    runs_before = set(training.RUNS_ROOT.glob("run-*")) if training.RUNS_ROOT.exists() else set()
    models_before = models.model_choices()
    tiny = {"per_class": 20, "depth": 1, "width": 64, "epochs": 1, "batch_size": 32}
    for payload in [*path_payloads(secret), "/etc/passwd", {"path": "/etc/passwd", "meta": FILE_DATA}]:
        event, data = call(app, "train", arguments(app, "train", source=training.SRC_ZIP, zip_file=payload, **tiny))
        assert event == "error", (payload, event, data)
    # The data source is a choice among fixed sources, never a path either.
    for source in ["/etc", str(secret), str(secret.parent)]:
        event, data = call(app, "train", arguments(app, "train", source=source, **tiny))
        assert event == "error" and ("not in the list of choices" in data or "Unknown data source" in data), data
    assert models.model_choices() == models_before
    assert (set(training.RUNS_ROOT.glob("run-*")) if training.RUNS_ROOT.exists() else set()) == runs_before
    # The same zip, uploaded, trains: the calls above differ by the zip's path alone.
    event, data = call(app, "train", arguments(app, "train", source=training.SRC_ZIP, zip_file=upload(app, secret), **tiny))
    assert event == "complete" and "Finished" in data, (event, data)

    # A model name is a key of the model picker, never a path.
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image = server_env / "upload.png"
    Image.new("RGB", (32, 32), "blue").save(image)
    client = client_for(app, tmp_path)
    for name in ["/etc/passwd", "../../etc/passwd", str(models.SHIPPED_CHECKPOINT)]:
        with pytest.raises(AppError, match="Unknown model"):
            client.predict(handle_file(str(image)), name, api_name="/classify")


@pytest.mark.slow
def test_files_route_serves_no_server_file(app, server_env):
    marker = b"3f1c-not-to-be-served"
    secret = server_env / "secret.txt"
    secret.write_bytes(marker)
    run_file = training.RUNS_ROOT / "run-files-route" / "model.safetensors"  # where trained runs live
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_bytes(marker)
    try:
        for path in [secret, run_file, Path("/etc/passwd"), models.SHIPPED_CHECKPOINT, ROOT / "README.md"]:
            response = httpx.get(f"{app.rstrip('/')}/gradio_api/file={path}", timeout=60)
            assert response.status_code == 403, (path, response.status_code)
            assert marker not in response.content and b"root:" not in response.content
    finally:
        run_file.unlink()
        run_file.parent.rmdir()


# ---------------------------------------------------------------------------------------------
# Upload size
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_uploads_over_the_limit_are_refused(app, server_env, tmp_path):
    limit = 20 * 1024**2  # "20mb" as Gradio reads it (1 MB = 1024**2 bytes)
    uploads = Path(os.environ["GRADIO_TEMP_DIR"])
    before = {p for p in uploads.rglob("*") if p.is_file()}
    with httpx.Client(base_url=app, timeout=120) as http:
        small = http.post("/gradio_api/upload", files={"files": ("small.bin", b"\0" * 1024**2)})
        assert small.status_code == 200 and len(small.json()) == 1
        big = http.post("/gradio_api/upload", files={"files": ("big.bin", b"\0" * (limit + 1))})
        assert big.status_code == 413 and "maximum allowed size" in big.text
    added = {p for p in uploads.rglob("*") if p.is_file()} - before
    assert [p.name for p in added] == ["small.bin"]  # nothing of the refused upload stays on disk

    # The same through gradio_client, with a PNG just over the limit: refused, never classified.
    from gradio_client import handle_file

    png = tmp_path / "huge.png"
    Image.new("RGB", (8, 8)).save(png)
    with open(png, "ab") as f:
        f.write(b"\0" * limit)  # bytes after the end of a PNG are ignored by decoders
    client = client_for(app, tmp_path)
    with pytest.raises(Exception, match="exceeds the maximum file size of 20971520 bytes"):  # checked before sending
        client.predict(handle_file(str(png)), api_name="/classify")


# ---------------------------------------------------------------------------------------------
# Temporary files
# ---------------------------------------------------------------------------------------------


def test_failed_run_leaves_no_folder(server_env, monkeypatch):
    def failing(model, train_data, *args, **kwargs):
        yield StepEvent(1, 1, 10, 1.0, 0.5, 1e-3, 100.0, 1.0)
        raise TrainingError("the loss became nan at step 2")

    monkeypatch.setattr(training, "engine_train", failing)
    before = set(training.RUNS_ROOT.glob("run-*")) if training.RUNS_ROOT.exists() else set()
    with pytest.raises(gr.Error, match="loss became nan"):
        for _ in train_tab.train_run(training.SRC_SYNTHETIC, None, per_class=24, depth=1, width=64, epochs=1, batch_size=32):
            pass
    assert set(training.RUNS_ROOT.glob("run-*")) == before


@pytest.mark.slow
def test_zip_training_and_classify_leave_no_temporary_files(server_env, tmp_path):
    from gradio_client import handle_file

    tmp = Path(tempfile.gettempdir())
    assert tmp == server_env
    uploads = Path(os.environ["GRADIO_TEMP_DIR"])
    demo, url = launch(server_name="127.0.0.1", server_port=free_port())
    try:
        assert demo.delete_cache == common.DELETE_CACHE
        client = client_for(url, tmp_path)
        data = class_folder_zip(tmp_path / "upload" / "shapes.zip")
        result = client.predict(training.SRC_ZIP, handle_file(str(data)), 20, 8, 1, 64, 1, 1e-3, 32, False, False, models.SHIPPED,
                                api_name="/train")
        assert "Finished" in result[2], result[2]
        name = result[3]  # the run's name in the picker
        images = []
        for i, colour in enumerate(["red", "green", "blue"]):
            images.append(tmp_path / "upload" / f"{colour}.png")
            Image.new("RGB", (40 + i, 40), colour).save(images[-1])
            assert client.predict(handle_file(str(images[-1])), api_name="/classify")["label"] in STAND_IN_CLASSES
            answer = client.predict(handle_file(str(images[-1])), name, api_name="/classify")
            # One of its classes, or (green, unlike both) "probably none of them"; ranked either way.
            assert answer["label"] in ("red", "blue", "⚠️ Probably none of its 2 classes")
            assert {c["label"] for c in answer["confidences"]} == {"red", "blue"}

        # The zip was unpacked into a temporary folder, deleted once read.
        assert list(tmp.glob("vitdemo-zip-*")) == []
        # The app keeps one folder per trained run it offers in the picker, and nothing else.
        offered = {models.MODELS.cached(n).checkpoint.parent for n in models.model_choices() if n.startswith("Run ")}
        assert set(training.RUNS_ROOT.glob("run-*")) == offered
        assert {p.name for p in common.APP_DIR.iterdir()} == {"examples", "runs"}
        # Gradio holds the uploads (the zip, each image once) and deletes them on its schedule.
        uploaded = {p for p in uploads.rglob("*") if p.is_file() and p.name in {"shapes.zip"} | {i.name for i in images}}
        assert sorted(p.name for p in uploaded) == sorted(["shapes.zip"] + [i.name for i in images])
        tracked = set().union(*demo.temp_file_sets)
        assert {str(p) for p in uploaded} <= tracked
    finally:
        demo.close()
    assert [p for p in uploaded if p.exists()] == []  # deleted when the server stopped
    assert list(tmp.glob("vitdemo-zip-*")) == []
