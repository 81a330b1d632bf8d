"""The HTTP API: search, cases, images by id only, health, OpenAPI, limits, concurrency, defaults."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dermcir.cli import build_parser, main
from dermcir.data import Case
from dermcir.data.text import CHECKLIST_FIELDS
from dermcir.index import add_cases, build_index, open_index, remove_cases
from dermcir.search import CaseSearcher
from dermcir.service import BackgroundServer, create_app

from .searchkit import encode, lesion, make_cases, make_index, one_torch_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("service")
    _ckpt, root, cases = make_index(tmp, 9)
    searcher = CaseSearcher(root)
    # entered, so that all requests share one event loop, as under uvicorn (the search limiter needs one loop)
    with TestClient(create_app(searcher, max_upload_bytes=200_000)) as client:
        yield tmp, root, cases, searcher, client


def _search(client: TestClient, image: bytes | None = None, name: str = "q.png", **fields):
    files = {"image": (name, image, "application/octet-stream")} if image is not None else None
    data = {k: str(v) for k, v in fields.items()}
    return client.post("/search", data=data, files=files)


def test_search_answers_the_cli_json_with_image_urls(env):
    *_, client = env
    res = _search(client, encode(lesion()), text="irregular streaks", pigment_network="atypical", k=4)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["query"]["mode"] == "composed"
    assert body["query"]["text"] == "Dermoscopy: pigment network atypical. irregular streaks"
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4]
    first = body["results"][0]
    assert set(first) >= {"rank", "case_id", "image", "diagnosis", "category", "score", "local", "global", "parts"}
    assert first["image_url"].startswith(f"/cases/{first['case_id']}/image?v=") and "heatmaps" not in first
    # the server's own folders stay private: only the file's name (the CLI and Python API keep the full path)
    assert first["image"] == f"case{first['case_id'][1:]}.png"
    # the research-use notice travels with the results (it was on /health and /checklist only, and the CLI's table)
    assert body["notice"].startswith("Research tool, not a diagnostic device")


def test_the_cli_json_carries_the_research_use_notice(env, capsys):
    _tmp, root, *_ = env
    assert main(["search", "--index", str(root), "--text", "irregular streaks", "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notice"].startswith("Research tool, not a diagnostic device")


def test_search_with_heatmaps_returns_query_view(env):
    *_, client = env
    body = _search(client, encode(lesion()), k=2, heatmaps="true").json()
    assert body["query"]["view"].startswith("data:image/jpeg;base64,")
    assert len(body["query"]["heatmaps"]) == 3 and len(body["results"][0]["heatmaps"][0]) == 16


def test_text_only_and_checklist_only(env):
    *_, client = env
    assert _search(client, text="blue-whitish veil present", k=2).json()["query"]["mode"] == "text"
    body = _search(client, blue_whitish_veil="present", sex="male", k=2).json()
    assert body["query"]["text"] == "Dermoscopy: blue-whitish veil present. Patient: male."


def test_empty_file_part_means_no_image(env):
    *_, client = env  # what a browser sends when no file was chosen
    res = client.post(
        "/search", data={"text": "streaks absent"}, files={"image": ("", b"", "application/octet-stream")}
    )
    assert res.status_code == 200 and res.json()["query"]["mode"] == "text"


def test_bad_k_and_unknown_fields_are_400(env):
    *_, client = env
    # "\u0663": an Arabic-Indic three; 5,000 digits: past Python's int() limit for strings
    for k in ("0", "abc", "1000", "+5", "1_0", "-3", "\u0663", "2.0", "9" * 5000):
        res = _search(client, text="x", k=k)
        assert res.status_code == 400 and "k must be an integer from 1 to 200" in res.json()["detail"]
    # a mistyped reserved field is told about the reserved ones too; a blank value does not hide the mistake
    for field, value in (("colour", "brown"), ("txt", "veil present"), ("Text", "veil present"), ("foo", "")):
        res = _search(client, text="x", **{field: value})
        detail = res.json()["detail"]
        assert res.status_code == 400 and detail.startswith(f"unknown field {field!r}; the fields are image, text, k, ")
        assert "heatmaps and the checklist fields pigment_network, streaks" in detail
    assert _search(client, text="x", **{"Pigment-Network": "typical"}).status_code == 200  # as the CLI takes them
    for value in ("yes", "2", "maybe"):
        res = _search(client, text="x", k=1, heatmaps=value)
        assert res.status_code == 400 and res.json()["detail"] == f"heatmaps must be true or false, got {value!r}"
    assert "heatmaps" in _search(client, text="x", k=1, heatmaps="True").json()["results"][0]
    assert "heatmaps" not in _search(client, text="x", k=1, heatmaps="false").json()["results"][0]
    res = client.post("/search", data={"image": "not a file"})
    assert res.status_code == 400 and "must be an uploaded file" in res.json()["detail"]


def test_repeated_fields_files_in_text_fields_and_json_bodies_are_refused(env):
    *_, client = env
    res = client.post("/search", data={"text": ["streaks irregular", "veil present"], "k": "2"})
    assert res.status_code == 400 and "field 'text' given more than once" in res.json()["detail"]
    res = client.post("/search", data={"pigment_network": ["typical", "atypical"], "streaks": "absent"})
    assert res.status_code == 400 and "field 'pigment_network' given more than once" in res.json()["detail"]
    res = client.post("/search", files={"pigment_network": ("a.txt", b"atypical", "text/plain")})
    assert res.status_code == 400 and "field 'pigment_network' must be text" in res.json()["detail"]
    png = ("q.png", encode(lesion()), "image/png")
    res = client.post("/search", files=[("image", png), ("image", png)])
    assert res.status_code == 400 and "field 'image' given more than once" in res.json()["detail"]
    res = client.post("/search", files=[("image", png), ("streaks", png), ("sex", png)])
    assert res.status_code == 400 and "field 'sex' must be text" in res.json()["detail"]
    res = client.post("/search", json={"text": "streaks irregular"})
    assert res.status_code == 415
    assert "expects a multipart/form-data form" in res.json()["detail"] and "application/json" in res.json()["detail"]


def test_case_details_and_image_by_id(env):
    _tmp, _root, cases, _s, client = env
    res = client.get(f"/cases/{cases[1].case_id}")
    assert res.status_code == 200
    assert res.json()["diagnosis"] == "melanoma"
    assert res.json()["image_url"] == f"/cases/c001/image?v={res.json()['sha1'][:12]}"
    assert res.json()["image"] == cases[1].image.name == "case001.png"
    img = client.get("/cases/c001/image", params={"size": 64})
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(img.content)).size == (64, 64)
    assert client.get("/cases/nope").status_code == 404
    assert client.get("/cases/c001/image", params={"size": 5000}).status_code == 422


def test_case_ids_with_url_characters(env):
    tmp, _root, _cases, searcher, _client = env
    ids = ["2021/0042", "A#1", "x?y", "50%", "x/image"]  # a clinic CSV may hold any of these
    made = make_cases(tmp / "odd", len(ids), start=80)
    cases = [Case(i, c.image, c.diagnosis, c.category, c.fields) for i, c in zip(ids, made, strict=True)]
    root = tmp / "odd-index"
    build_index(cases, searcher.checkpoint, root, model=searcher.model, cache_dir=tmp / "cache", progress=False)
    client = TestClient(create_app(CaseSearcher(root)))
    results = _search(client, text="streaks irregular", k=len(ids)).json()["results"]
    assert sorted(r["case_id"] for r in results) == sorted(ids)
    for r in results:
        url = r["image_url"]
        path, version = url.split("?v=")
        assert path == f"/cases/{quote(r['case_id'], safe='')}/image" and len(version) == 12
        image = client.get(url)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg", (url, image.text)
        record = client.get(path.removesuffix("/image"))
        assert record.status_code == 200 and record.json()["case_id"] == r["case_id"], url
        assert record.json()["image_url"] == url
    assert client.get("/cases/2021/0042").json()["case_id"] == "2021/0042"  # typed by hand, unencoded


def test_case_image_sizes_are_snapped_and_their_cache_is_bounded_in_bytes(env, monkeypatch):
    import dermcir.service.app as app_module

    _tmp, _root, cases, searcher, _client = env
    app = create_app(searcher)
    with TestClient(app) as client:
        def size_of(size: int) -> tuple[int, int]:
            return Image.open(io.BytesIO(client.get("/cases/c001/image", params={"size": size}).content)).size

        # any size from 16 to 1024 is rounded up to one of a few, so a client looping over sizes renders only those
        assert [size_of(n) for n in (16, 48, 64, 200, 1000)] == [(64, 64), (64, 64), (64, 64), (256, 256), (1024, 1024)]
        cache = app.state.case_images
        for n in range(16, 1025, 7):
            client.get("/cases/c001/image", params={"size": n})
        assert len(cache) <= 8
        one = len(client.get(f"/cases/{cases[0].case_id}/image", params={"size": 128}).content)
    monkeypatch.setattr(app_module, "CASE_IMAGE_CACHE_BYTES", 3 * one)  # room for about three thumbnails
    app = create_app(searcher)
    with TestClient(app) as client:
        cache = app.state.case_images
        for case in cases:  # older images are dropped
            assert client.get(f"/cases/{case.case_id}/image", params={"size": 128}).status_code == 200
        assert 0 < cache.bytes <= cache.max_bytes == 3 * one and 1 < len(cache) < len(cases)
        # a render larger than the whole cache is served all the same, and not kept (nor does it evict the others)
        kept = (len(cache), cache.bytes)
        big = client.get(f"/cases/{cases[0].case_id}/image", params={"size": 1024})
        assert big.status_code == 200 and len(big.content) > 3 * one and (len(cache), cache.bytes) == kept


def test_a_replaced_case_gets_a_new_image_url(tmp_path, env):
    *_, searcher, _client = env  # a browser caches case images: a replaced image must not be shown from its cache
    _ckpt, root, _cases = make_index(tmp_path, 3, ckpt=searcher.checkpoint, model=searcher.model)
    with TestClient(create_app(CaseSearcher(root))) as client:
        before = client.get("/cases/c001").json()["image_url"]
        first = client.get(before)
        assert "max-age" in first.headers["cache-control"]
        assert _search(client, text="streaks absent", k=3).json()["results"][0]["image_url"].split("?v=")[1]
        replacement = make_cases(tmp_path / "new", 2)[0].image  # another lesion, under c001's id
        changed = Case("c001", replacement, "melanoma", "melanoma", {})
        add_cases(root, [changed], replace=True, model=searcher.model, cache_dir=tmp_path / "cache", progress=False)
        after = client.get("/cases/c001").json()["image_url"]
        assert after != before and after.split("?")[0] == before.split("?")[0]
        assert client.get(after).content != first.content
        results = _search(client, text="streaks absent", k=3).json()["results"]
        assert next(r for r in results if r["case_id"] == "c001")["image_url"] == after
        # a page still holding the old URL gets the new image, and its browser is told not to keep it
        stale = client.get(before)
        assert stale.content == client.get(after).content and stale.headers["cache-control"] == "private, no-cache"


def test_an_unreadable_case_image_is_a_404_without_the_servers_folders(tmp_path, env, caplog):
    *_, searcher, _client = env
    _ckpt, root, cases = make_index(tmp_path, 2, ckpt=searcher.checkpoint, model=searcher.model)
    cases[1].image.unlink()
    with TestClient(create_app(CaseSearcher(root))) as client:
        res = client.get("/cases/c001/image")
    assert res.status_code == 404
    assert res.json()["detail"] == "case 'c001': its image can no longer be read (case001.png: file not found)"
    assert str(cases[1].image) in caplog.text  # the service's log says where it looked


def test_image_route_never_reads_a_path_from_the_request(env):
    *_, client = env
    for attempt in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "c001%2F..%2F..%2Fsecret"):
        res = client.get(f"/cases/{attempt}/image")
        assert res.status_code == 404
        assert res.headers["content-type"] != "image/jpeg"
    assert client.get("/cases/c001/image", params={"path": "/etc/passwd"}).headers["content-type"] == "image/jpeg"


def test_health_checklist_openapi_and_page(env):
    *_, searcher, client = env
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["cases"] == 9 and health["fingerprint"] == searcher.fingerprint
    spec = client.get("/checklist").json()
    assert spec["fields"]["streaks"]["values"] == list(CHECKLIST_FIELDS["streaks"][1])
    assert spec["max_text_tokens"] == searcher.model.text_encoder.max_tokens and spec["max_text_chars"] == 10_000
    schema = client.get("/openapi.json").json()
    form = schema["paths"]["/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "text", "k", *CHECKLIST_FIELDS} <= set(form["properties"])
    assert {"/cases/{case_id}", "/cases/{case_id}/image", "/health"} <= set(schema["paths"])
    errors = schema["paths"]["/search"]["post"]["responses"]
    assert {"400", "409", "413", "415", "500", "503"} <= set(errors)
    detail = errors["400"]["content"]["application/json"]["schema"]
    detail = schema["components"]["schemas"][detail["$ref"].rsplit("/", 1)[1]] if "$ref" in detail else detail
    assert detail["properties"]["detail"]["type"] == "string" and detail["required"] == ["detail"]
    assert "404" in schema["paths"]["/cases/{case_id}"]["get"]["responses"]
    # the interactive /docs page loads Swagger UI from a CDN, blank on an offline hospital network: not served
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and "not a diagnostic device" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_head_is_answered_wherever_get_is_without_a_body(env):
    """Uptime monitors and caches probe with HEAD: the same status and headers as GET, no body; no HEAD on POST."""
    *_, client = env
    for path in ("/health", "/", "/static/app.js", "/cases/c001", "/cases/c001/image?size=64", "/cases/nope"):
        got, head = client.get(path), client.head(path)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content)), path
    search = client.head("/search")
    assert search.status_code == 405 and search.headers["allow"] == "POST" and search.content == b""


def test_every_answer_carries_the_security_headers(env):
    """The page renders case data as text; the policy backs that up (own scripts only, no framing, no sniffing)."""
    *_, client = env
    answers = [client.get(path) for path in ("/", "/static/app.js", "/health", "/cases/c001/image?size=64", "/nope")]
    answers.append(_search(client, b"\xff\xd8" + b"\x00" * 300_000, name="big.jpg"))  # the upload limit's own 413
    for res in answers:
        assert res.headers["x-content-type-options"] == "nosniff", res.url
        assert res.headers["x-frame-options"] == "DENY", res.url
        policy = res.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy, res.url
    assert answers[-1].status_code == 413
    # what the page itself needs: the query as the model saw it (data:) and the chosen file's preview (blob:)
    assert "img-src 'self' data: blob:" in answers[0].headers["content-security-policy"]


def test_case_data_is_not_kept_by_shared_caches(env):
    """Case images were sent as plain "max-age=86400" (a hospital proxy could keep them a day), records and results
    with no cache policy at all."""
    *_, client = env
    image_url = client.get("/cases/c001").json()["image_url"]
    assert client.get(image_url).headers["cache-control"] == "private, max-age=86400"
    for res in (client.get("/cases/c001"), client.get("/health"), _search(client, text="streaks absent", k=2),
                client.get("/cases/nope"), _search(client, text="streaks sometimes", k=0)):
        assert res.headers["content-type"].startswith("application/json"), res.url
        assert res.headers["cache-control"] == "no-store", (res.url, res.status_code)


def test_a_url_encoded_form_is_read_as_utf8_like_every_other_interface(env):
    """``curl -d "text=lésion ..."`` sends the form URL-encoded, as UTF-8 bytes; the web framework read it as Latin-1
    and the model got "lÃ©sion", a different ranking, with a 200."""
    searcher, client = env[-2], env[-1]
    text = "lésion pigmentée, réseau atypique ≥ 6 mm"
    expected = searcher.search(text=text, k=3).to_dict()
    for body in (f"text={text}&k=3".encode(), f"text={quote(text)}&k=3".encode()):  # raw (curl -d) and %-encoded
        res = client.post("/search", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
        assert res.status_code == 200, res.text
        assert res.json()["query"]["text"] == text == expected["query"]["text"]
        assert [r["case_id"] for r in res.json()["results"]] == [r["case_id"] for r in expected["results"]]
    for body in (b"text=l\xe9sion&k=3", b"text=l%E9sion&k=3"):  # Latin-1, raw or %-encoded: refused, not guessed
        res = client.post("/search", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
        assert res.status_code == 400 and "the form is not UTF-8" in res.json()["detail"], res.text
    res = client.post("/search", content="&".join(f"f{i}=x" for i in range(80)).encode(),
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert res.status_code == 400 and "too many fields" in res.json()["detail"]


def test_upload_limit_declared_and_streamed(env):
    *_, client = env
    big = b"\xff\xd8" + b"\x00" * 300_000
    res = _search(client, big, name="big.jpg")
    assert res.status_code == 413 and "200,000 bytes" in res.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
        for _ in range(40):
            yield b"\x00" * 10_000

    res = client.post("/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert res.status_code == 413
    assert client.get("/health").status_code == 200


def _stalled_upload(url: str) -> socket.socket:
    """A connection that declares a 100 kB search form, sends 1 kB of it and goes silent."""
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /search HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Length: 100000\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\nContent-Disposition: form-data; "
                 b'name="image"; filename="x.jpg"\r\n\r\n' + b"\x00" * 1000)
    return sock


def test_a_stalled_upload_is_given_up_and_connections_are_bounded(env):
    """Clients that sent part of an upload and went silent held their connection and spooled part for good (twenty
    of them held 180 MB in /tmp a minute later); nothing bounded how many connections were open."""
    *_, searcher, _client = env
    with BackgroundServer(create_app(searcher, body_timeout_s=1.0), max_connections=3) as url:
        stalled = _stalled_upload(url)
        started = time.monotonic()
        answer = b""
        while chunk := stalled.recv(4096):  # the answer, then the server closes the connection
            answer += chunk
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "no part of the request body arrived for 1 s" in answer and time.monotonic() - started < 10
        stalled.close()
    with BackgroundServer(create_app(searcher), max_connections=1) as url:  # uvicorn's limit of 1 refused everything
        assert httpx.get(url + "health", timeout=30).status_code == 200
    with BackgroundServer(create_app(searcher, body_timeout_s=None), max_connections=2) as url:
        held = []
        for _ in range(2):  # one at a time, so that each is read while under the bound
            held.append(_stalled_upload(url))
            time.sleep(0.5)
        # a third open connection: refused at once
        assert httpx.get(url + "health", timeout=30).status_code == 503
        for sock in held:
            sock.close()
        time.sleep(0.5)
        assert httpx.get(url + "health", timeout=30).status_code == 200
    with pytest.raises(ValueError, match="body_timeout_s must be a positive number of seconds or None, got 0"):
        create_app(searcher, body_timeout_s=0)


def test_concurrent_requests(env):
    *_, client = env
    images = [encode(lesion(seed=s)) for s in range(4)]
    expected = [_search(client, img, k=3).json()["results"] for img in images]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda img: _search(client, img, k=3).json()["results"], images * 3))
    assert got == expected * 3


def _search_into(codes: list, client: TestClient) -> None:
    codes.append(_search(client, text="irregular streaks", k=2).status_code)


def test_searches_beyond_the_concurrency_limit_wait_their_turn(env, monkeypatch):
    *_, searcher, _client = env
    running, most = [0], [0]
    lock = threading.Lock()
    real = searcher.search

    def counted(**query):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.2)  # long enough for the other requests to arrive meanwhile
            return real(**query)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(searcher, "search", counted)
    # entered, all requests share one event loop (as under uvicorn); not entered, each runs in a loop of its own,
    # where a waiter is never woken by another loop's limiter (they hung): the limit must hold either way
    for limit, entered in ((2, True), (6, True), (2, False)):
        most[0] = 0
        client = TestClient(create_app(searcher, max_concurrent_searches=limit))
        codes = []
        with client if entered else contextlib.nullcontext(client):
            # daemon threads, joined with a time limit: a search that hangs fails the test instead of stalling it
            threads = [threading.Thread(target=_search_into, args=(codes, client), daemon=True) for _ in range(6)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        assert codes == [200] * 6, f"limit {limit}, {'one loop' if entered else 'a loop per request'}: {codes}"
        # with room for all six, they do overlap: the limit of 2 is what holds them back
        assert most[0] == 2 if limit == 2 else most[0] > 2
    with pytest.raises(ValueError, match="max_concurrent_searches must be at least 1"):
        create_app(searcher, max_concurrent_searches=0)


def _blocked_search(searcher, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make ``searcher.search`` wait for ``release``; ``started`` is set once one search is running."""
    started, release = threading.Event(), threading.Event()
    real = searcher.search

    def blocked(**query):
        started.set()
        release.wait(60)
        return real(**query)

    monkeypatch.setattr(searcher, "search", blocked)
    return started, release


def test_waiting_searches_hold_no_threads_so_health_answers(env, monkeypatch):
    *_, searcher, _client = env
    started, release = _blocked_search(searcher, monkeypatch)
    app = create_app(searcher, max_concurrent_searches=1, max_waiting_searches=100)
    n = 45  # more searches than anyio's 40 worker threads: waiting ones must not hold a thread each
    with BackgroundServer(app) as url, ThreadPoolExecutor(n) as pool:
        try:
            post = lambda _: httpx.post(url + "search", data={"text": "streaks irregular", "k": "1"}, timeout=120)
            replies = [pool.submit(post, i) for i in range(n)]
            assert started.wait(30)
            time.sleep(1.5)  # let the others arrive and queue
            t0 = time.monotonic()
            health = httpx.get(url + "health", timeout=10)
            assert health.status_code == 200 and time.monotonic() - t0 < 5
            assert httpx.get(url + "checklist", timeout=10).status_code == 200
        finally:
            release.set()
        assert [r.result().status_code for r in replies] == [200] * n


def test_a_full_search_queue_is_refused_with_503(env, monkeypatch):
    *_, searcher, _client = env
    started, release = _blocked_search(searcher, monkeypatch)
    app = create_app(searcher, max_concurrent_searches=1, max_waiting_searches=1)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(_search, client, text="streaks irregular", k=1)
            assert started.wait(30)
            second = pool.submit(_search, client, text="streaks irregular", k=1)
            deadline = time.monotonic() + 30
            while app.state.search_admission.admitted < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            third = _search(client, text="streaks irregular", k=1)
            assert third.status_code == 503 and third.headers["retry-after"]
            assert third.json()["detail"] == "the service is busy: 2 searches running or waiting; try again shortly"
        finally:
            release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    with pytest.raises(ValueError, match="max_waiting_searches must be at least 0"):
        create_app(searcher, max_waiting_searches=-1)


def test_a_burst_of_searches_gets_no_more_places_than_the_queue_has(env, monkeypatch):
    """Requests arriving together all passed a check of the queue's length before any of them joined it."""
    import anyio

    *_, searcher, _client = env
    started, release = _blocked_search(searcher, monkeypatch)
    app = create_app(searcher, max_concurrent_searches=1, max_waiting_searches=1)
    n = 20

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=app)  # one event loop, as under uvicorn, with every request at once
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            codes: list[int] = []

            async def post() -> None:
                codes.append((await client.post("/search", data={"text": "streaks irregular", "k": "1"})).status_code)

            async with anyio.create_task_group() as group:
                for _ in range(n):
                    group.start_soon(post)
                with anyio.move_on_after(30):  # the refused come back at once; the admitted wait for the release
                    while len(codes) < n - 2:
                        await anyio.sleep(0.05)
                release.set()
            return sorted(codes)

    try:
        assert anyio.run(burst) == [200] * 2 + [503] * (n - 2)
    finally:
        release.set()
    assert started.is_set() and app.state.search_admission.admitted == 0


def test_a_search_whose_client_left_while_waiting_is_skipped(env, monkeypatch):
    """The page's Cancel (or its time limit) leaves; the search it queued must not run the model for no one."""
    from starlette.requests import ClientDisconnect, Request

    *_, searcher, client = env
    ran = []
    monkeypatch.setattr(searcher, "search", lambda **query: ran.append(query))

    async def gone(self):
        return True

    monkeypatch.setattr(Request, "is_disconnected", gone)
    assert _search(client, text="streaks irregular", k=1).status_code == 499 and ran == []
    monkeypatch.undo()

    async def left_during_upload(request):
        raise ClientDisconnect()

    import dermcir.service.app as app_module

    monkeypatch.setattr(app_module, "_read_query", left_during_upload)
    assert _search(client, text="streaks irregular", k=1).status_code == 499  # not a 500 "the service failed"


def test_serve_passes_its_search_limits_to_the_app(env, monkeypatch):
    import dermcir.service

    _tmp, root, *_ = env
    made = []
    monkeypatch.setattr(dermcir.service, "create_app", lambda searcher, **limits: made.append(limits))
    served = []
    monkeypatch.setattr(dermcir.service, "serve", lambda app, host, port, **kw: served.append(
        (kw["allowed_host_names"], kw["max_connections"])))
    from dermcir.cli import main

    assert main(["serve", "--index", str(root), "--max-concurrent", "3", "--max-waiting", "0",
                 "--allowed-host", "dermcir.clinic.example", "--allowed-host", "proxy"]) == 0
    assert made == [{"max_upload_bytes": 10 * 1024 * 1024, "max_concurrent_searches": 3, "max_waiting_searches": 0}]
    assert served == [(["dermcir.clinic.example", "proxy"], None)]  # no bound unless asked (idle sockets count)
    assert main(["serve", "--index", str(root), "--max-connections", "16"]) == 0
    assert served[-1] == ([], 16)


def test_index_update_while_serving(env):
    tmp, root, _cases, searcher, client = env
    before = client.get("/health").json()
    add_cases(
        root, make_cases(tmp / "late", 1, start=70), model=searcher.model, cache_dir=tmp / "cache", progress=False
    )
    assert client.get("/cases/c070").status_code == 200  # seen before any search arrives
    health = client.get("/health").json()
    assert health["cases"] == before["cases"] + 1 and health["index_version"] != before["index_version"]
    body = _search(client, text="pigment network typical", k=50).json()
    assert body["index"]["cases"] == before["cases"] + 1 and body["index"]["version"] == health["index_version"]


def test_a_damaged_new_version_does_not_stop_the_service(tmp_path, env):
    *_, searcher, _client = env
    _ckpt, root, _cases = make_index(tmp_path, 3, ckpt=searcher.checkpoint, model=searcher.model)
    client = TestClient(create_app(CaseSearcher(root)))
    good = client.get("/health").json()["index_version"]
    remove_cases(root, ["c002"])
    (open_index(root).folder / "vectors.npy").write_bytes(b"\x93NUMPY truncated")
    for _ in range(2):
        res = _search(client, text="streaks absent", k=5)
        assert res.status_code == 200 and res.json()["index"]["version"] == good, res.text
    assert client.get("/health").json()["index_version"] == good


def test_a_failure_on_the_service_side_is_a_json_500_not_a_400(env, monkeypatch, caplog):
    *_, searcher, client = env

    def broken(*_args, **_kw):
        raise ValueError("vectors must have shape (n, 192), got (1, 96)")

    monkeypatch.setattr(searcher, "_encode", broken)
    res = _search(client, text="streaks absent", k=2)
    assert res.status_code == 500
    # the kind only: a message may name the server's files, so it goes to the log
    assert res.json()["detail"] == "the service failed: ValueError (the service's log has the details)"
    assert "vectors must have shape (n, 192), got (1, 96)" in caplog.text
    monkeypatch.undo()
    assert _search(client, text="x", k="0").status_code == 400  # the client's errors stay 400


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), MemoryError(), OSError(28, "No space left")])
def test_any_other_failure_is_the_same_json_500(env, monkeypatch, caplog, error):
    *_, searcher, _client = env

    def broken(*_args, **_kw):
        raise error

    monkeypatch.setattr(searcher, "_encode", broken)
    # Starlette re-raises after answering, for the server to log the traceback; a test client must not raise it here
    with TestClient(create_app(searcher), raise_server_exceptions=False) as client:
        res = _search(client, text="streaks absent", k=2)
    assert res.status_code == 500 and res.headers["content-type"] == "application/json"
    assert res.json()["detail"].startswith("the service failed: ") and type(error).__name__ in res.json()["detail"]
    assert any("POST /search failed" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_a_loopback_server_answers_only_loopback_host_names(env):
    *_, searcher, _client = env
    with BackgroundServer(create_app(searcher)) as url:
        port = url.rstrip("/").rsplit(":", 1)[1]

        def status(host: str) -> int:
            return httpx.get(url + "health", headers={"Host": host}, timeout=30).status_code

        # a page the user visits may point its own name at 127.0.0.1 (DNS rebinding): its requests carry that name
        assert status(f"attacker.example:{port}") == 400
        assert [status(f"{h}:{port}") for h in ("127.0.0.1", "localhost", "[::1]")] == [200, 200, 200]
    from dermcir.service.server import allowed_hosts

    assert allowed_hosts("127.0.0.2") == ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"]
    assert allowed_hosts("::1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("192.168.1.20") is None  # reached by names unknown here
    # ... unless the names clients use are given: then only they, and the address itself (not a wildcard one)
    # (a wildcard address listens on loopback too: its names, and the address the start-up line prints)
    assert allowed_hosts("0.0.0.0", extra=["dermcir.clinic"]) == [
        "127.0.0.1", "localhost", "[::1]", "0.0.0.0", "dermcir.clinic"]
    assert allowed_hosts("::", extra=["dermcir.clinic"]) == ["127.0.0.1", "localhost", "[::1]", "[::]", "dermcir.clinic"]
    assert allowed_hosts("10.1.2.3", extra=["dermcir.clinic"]) == ["10.1.2.3", "dermcir.clinic"]
    assert allowed_hosts("myhost", "10.1.2.3", ["a.b"]) == ["myhost", "10.1.2.3", "a.b"]
    # decided by the address bound, not the name given: a name /etc/hosts maps to loopback is checked too
    assert allowed_hosts("myhost", "127.0.1.1") == ["127.0.0.1", "localhost", "[::1]", "myhost"]
    assert allowed_hosts("myhost", "192.168.1.20") is None
    assert allowed_hosts("127.0.0.1", extra=["proxy.example"])[-1] == "proxy.example"  # --allowed-host


@pytest.mark.parametrize("bound", ["0.0.0.0", "10.1.2.3"])
def test_allowed_host_names_are_enforced_on_an_address_other_machines_reach(env, bound, caplog):
    """The documented set-up behind a load balancer (``--host 0.0.0.0 --allowed-host NAME``) answered any Host: the
    option was read on loopback addresses only, so a page rebinding its name to the service's address read the cases.
    The socket stands in for one bound there (nothing listens on the network)."""
    from dermcir.service.server import _guarded

    *_, searcher, _client = env

    class BoundThere:
        def getsockname(self):
            return (bound, 8000)

    with caplog.at_level("WARNING", logger="dermcir"):
        guarded = _guarded(create_app(searcher), bound, BoundThere(), ["dermcir.clinic.example"])
    client = TestClient(guarded)
    assert client.get("/health", headers={"Host": "attacker.example"}).status_code == 400
    assert client.get("/health", headers={"Host": "dermcir.clinic.example:8000"}).status_code == 200
    assert client.get("/health", headers={"Host": "10.1.2.3"}).status_code == (200 if bound == "10.1.2.3" else 400)
    # on 0.0.0.0 the machine's own names and the printed address work (`curl localhost`, a container's health check)
    for own in ("localhost:8000", "127.0.0.1:8000", "0.0.0.0:8000"):
        assert client.get("/health", headers={"Host": own}).status_code == (200 if bound == "0.0.0.0" else 400), own
    assert "reachable from other machines" in caplog.text and "any Host name is answered" not in caplog.text
    with caplog.at_level("WARNING", logger="dermcir"):  # without the names: any, and the log says how to restrict
        assert TestClient(_guarded(create_app(searcher), bound, BoundThere(), [])).get(
            "/health", headers={"Host": "attacker.example"}).status_code == 200
    assert "any Host name is answered; --allowed-host NAME" in caplog.text


def test_a_host_name_bound_to_loopback_is_checked_and_allowed_names_are_answered(env, caplog):
    """``--host localhost`` binds 127.0.0.1 by name; a reverse proxy's name is answered when allowed."""
    *_, searcher, _client = env
    with caplog.at_level("WARNING", logger="dermcir"), \
            BackgroundServer(create_app(searcher), host="localhost", allowed_host_names=["proxy.example"]) as url:
        port = url.rstrip("/").rsplit(":", 1)[1]

        def status(host: str) -> int:
            return httpx.get(url + "health", headers={"Host": host}, timeout=30).status_code

        assert [status(f"{h}:{port}") for h in ("attacker.example", "proxy.example", "localhost")] == [400, 200, 200]
    assert "reachable from other machines" not in caplog.text


def test_serve_listens_on_localhost_by_default():
    args = build_parser().parse_args(["serve", "--index", "x"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert build_parser().parse_args(["demo", "--data", "x"]).host == "127.0.0.1"


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_bad_port_is_refused_before_anything_loads(port, capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "--index", "x", "--port", port])
    assert caught.value.code == 2 and "expected a port number from 0 to 65535" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--index", "x", "--port", "0"]).port == 0  # 0 picks a free port


def test_several_services_on_one_index_root_follow_one_writer(tmp_path):
    """Scaling out: services in separate processes (as on separate machines sharing the index folder) each load the
    live version; an update by another process is answered by every one of them from their next request on."""
    import os
    import subprocess
    import sys

    ckpt, root, _cases = make_index(tmp_path, 4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DERMCIR_CACHE": str(tmp_path / "cache")}
    services, urls = [], []
    try:
        for _ in range(2):
            proc = subprocess.Popen([sys.executable, "-m", "dermcir", "serve", "--index", str(root), "--port", "0"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            services.append(proc)
            line = proc.stdout.readline()  # "dermcir serve: open http://127.0.0.1:PORT/ in a browser ..."
            urls.append(next(word for word in line.split() if word.startswith("http://")))
        before = {httpx.get(url + "health", timeout=30).json()["index_version"] for url in urls}
        assert len(before) == 1 and all(httpx.get(url + "cases/c070", timeout=30).status_code == 404 for url in urls)
        add_cases(root, make_cases(tmp_path / "late", 1, start=70), checkpoint=ckpt, cache_dir=tmp_path / "cache",
                  progress=False)  # the one writer, here in the test's own process
        for url in urls:
            assert httpx.get(url + "cases/c070", timeout=30).status_code == 200
            health = httpx.get(url + "health", timeout=30).json()
            assert health["cases"] == 5 and health["index_version"] not in before
    finally:
        for proc in services:
            proc.terminate()
            proc.wait(timeout=30)
