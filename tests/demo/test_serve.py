"""`fedrec serve`: the demo page through Flask's test client (no Ray, no browser), on a tiny central run."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from html import unescape
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrec.cli.main import cli

SMALL = ["--synthetic-users", "80", "--synthetic-items", "50", "--synthetic-density", "0.2", "--dim", "8",
         "--model", "mf"]  # the page of an MF run (what --model auto runs under the demo's partial participation)
TOKEN = "test-token-" + "x" * 32  # the tests' own; `fedrec serve` makes a random one per start


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "central"
    result = CliRunner().invoke(cli, ["central", *SMALL, "--epochs", "6", "--eval-every", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def demo(run):
    from fedrec.demo.demo import Demo

    return Demo(run)


@pytest.fixture
def app(demo):
    from fedrec.demo.app import create_app

    return create_app(demo, TOKEN)


def visitor(app):
    """A test client that opened the page with the token, as a visitor does with the printed URL."""
    client = app.test_client()
    assert client.get(f"/?token={TOKEN}").status_code == 303
    return client


def text_of(page: str, element_id: str) -> str:
    """The text inside the element with this id (markup stripped), or '' if there is none."""
    match = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', page, re.S)
    return "" if match is None else " ".join(unescape(re.sub(r"<[^>]+>", " ", match.group(2))).split())


def recommended(page: str) -> list[str]:
    return re.findall(r'<li class="rec" data-item="([^"]+)">', page)


def csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def act_as(client, user: str) -> str:
    """Pick `user` with the index form, as a visitor does (it claims the device if no one holds it); the token."""
    token = csrf(client.get("/").get_data(as_text=True))
    assert client.get(f"/device?user={user}&csrf={token}").status_code == 302
    return token


def cold_start_form(client) -> tuple[str, list[str]]:
    page = client.get("/new").get_data(as_text=True)
    return csrf(page), re.findall(r'<select class="rating" id="[^"]+" name="(rating-[^"]+)"', page)


def test_index_shows_the_user_form_the_cold_start_link_and_the_plot(app):
    client = visitor(app)
    page = client.get("/").get_data(as_text=True)
    for element in ('<form id="pick-user"', 'id="user-input" name="user"', 'id="pick-button"', 'id="new-device"',
                    '<img id="plot" src="/plot.png"'):
        assert element in page
    assert 'id="error"' not in page and "http" not in page.split("<body>")[0].replace("http-equiv", "")
    plot = client.get("/plot.png")
    assert plot.status_code == 200 and plot.mimetype == "image/png" and plot.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/static/style.css").status_code == 200


def test_the_index_says_which_protections_the_runs_algorithm_refuses_in_its_own_words(app, demo, monkeypatch):
    from fedrec.models.algorithm import DP, SECURE_AGGREGATION

    client = visitor(app)
    intro = text_of(client.get("/").get_data(as_text=True), "intro")
    assert demo.algorithm.refuses == {} and "must be trusted" not in intro  # MF admits both
    refusing = SimpleNamespace(title="a test algorithm", refuses={SECURE_AGGREGATION: "its sums give users away",
                                                                  DP: "its chain drowns in noise"})
    monkeypatch.setattr(demo, "algorithm", refusing)  # what BPMF declares, as any algorithm would
    intro = text_of(client.get("/").get_data(as_text=True), "intro")
    assert ("This run's algorithm, a test algorithm, admits no secure aggregation: its sums give users away; and no "
            "differential privacy: its chain drowns in noise. Its server must be trusted.") in intro


def test_device_page_shows_ratings_vector_recommendations_and_never_uploaded(app, demo):
    from fedrec.datasets import cohort

    client = visitor(app)
    token = csrf(client.get("/").get_data(as_text=True))
    picked = client.get(f"/device?user=7&csrf={token}")
    assert picked.status_code == 302 and picked.headers["Location"].endswith("/device/7")
    page = client.get("/device/7").get_data(as_text=True)
    rated = cohort(demo.split, [demo.row_of("7")]).train_item
    assert "you now act as this device" in text_of(page, "claim-status")
    on_device = text_of(page, "on-device")  # a central baseline: nothing "never uploaded" about pooled ratings
    assert "never uploaded" not in on_device and "ratings were pooled on one server" in on_device
    assert all(f"<td>item {demo.item_ids[i]}</td>" in page for i in rated)  # synthetic titles: "item N"
    assert len(text_of(page, "vector").split()) == 8 and text_of(page, "bias")
    assert re.fullmatch(r"[\d,]+ bytes", text_of(page, "bytes-stored"))
    picks = recommended(page)
    assert len(picks) == 10 and not {str(demo.item_ids[i]) for i in rated} & set(picks)
    scores = [float(s) for s in re.findall(r'<span class="score">([\d.]+)</span>', page)]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 1 and max(scores) <= 5
    for section in ("uploads", "epsilon", "consent", "forget", "opt-out", "forget-button"):
        assert f'id="{section}"' in page
    assert "No replay here: a central run trained on everyone's pooled ratings" in text_of(page, "forget-replay")


def test_a_federated_run_says_never_uploaded_and_lists_what_else_was_sent(app, demo, monkeypatch):
    import fedrec.demo.app as serve_app

    monkeypatch.setattr(demo, "federated", True)
    monkeypatch.setattr(demo, "cfg", dataclasses.replace(demo.cfg, dp="central"))
    view = vars(dataclasses.replace(serve_app.view_of(demo, "7"), epsilon=1.5, audit_evidence="audit.jsonl says so"))
    says = {"7": [], "8": ["the server sees it un-noised"]}  # F's DeviceView.also_sent, where it has one
    monkeypatch.setattr(serve_app, "view_of", lambda demo_, user: SimpleNamespace(**{**view, "also_sent": says[user]}))
    client = visitor(app)
    act_as(client, "7")
    page = client.get("/device/7").get_data(as_text=True)
    assert "never uploaded" in text_of(page, "on-device") and "central baseline" not in text_of(page, "on-device")
    assert "against readers of the run, not the server" in text_of(page, "epsilon")
    act_as(client, "8")
    page = client.get("/device/8").get_data(as_text=True)  # the device view says it: said once
    assert "the server sees it un-noised" in text_of(page, "also-sent") and "readers" not in text_of(page, "epsilon")


def test_cold_start_recommends_ten_unrated_items_from_five_ratings(app):
    client = visitor(app)
    token, selects = cold_start_form(client)
    assert len(selects) >= 12 and 'id="opt-in" name="opt-in" value="1">' in client.get("/new").get_data(as_text=True)
    rated = selects[:5]
    reply = client.post("/new", data={"csrf": token, **{name: "5" for name in rated}})
    page = reply.get_data(as_text=True)
    assert reply.status_code == 200 and 'id="error"' not in page
    picks = recommended(page)
    assert len(picks) == 10 and not {name.removeprefix("rating-") for name in rated} & set(picks)
    assert float(text_of(page, "fit-seconds")) < 0.5
    assert "You did not opt in: this device sends nothing" in page and 'id="join"' not in page


def test_opting_in_shows_what_would_be_sent_and_that_nothing_was(app, demo):
    client = visitor(app)
    token, selects = cold_start_form(client)
    page = client.post("/new", data={"csrf": token, "opt-in": "1", **{n: "4" for n in selects[:4]}}).get_data(
        as_text=True)
    join = text_of(page, "join")
    assert f"item-emb {demo.split.n_items}×8" in join and "Nothing was sent" in join


@pytest.mark.parametrize("form, status, message", [
    ({}, 400, "the form is empty"),
    ({"rating-X": "9"}, 400, "outside the scale 1 to 5"),
    ({"rating-X": "four"}, 400, "is not a number"),
    ({"rating-X": "nan"}, 400, "outside the scale"),
    ({"rating-X": "3"}, 400, "too few"),
    ({"rating-nosuchitem": "3"}, 400, "unknown movie"),
])
def test_bad_cold_start_input_is_a_clear_message_on_the_page(app, form, status, message):
    client = visitor(app)
    token, selects = cold_start_form(client)
    form = {k.replace("rating-X", selects[0]): v for k, v in form.items()}
    reply = client.post("/new", data={"csrf": token, **form})
    page = reply.get_data(as_text=True)
    assert reply.status_code == status and message in text_of(page, "error") and "Traceback" not in page
    assert '<form id="cold-start-form"' in page  # the visitor can correct it right there


def test_unknown_user_is_404_with_a_message_and_the_form_to_try_again(app):
    client = visitor(app)
    for path in ("/device/100000", "/device?user=100000", "/plot.png?user=100000"):
        reply = client.get(path)
        page = reply.get_data(as_text=True)
        assert reply.status_code == 404 and "unknown user '100000'" in text_of(page, "error"), path
        assert '<form id="pick-user"' in page and "Traceback" not in page
    assert "type a user id" in text_of(client.get("/device?user=").get_data(as_text=True), "error")
    assert client.get("/no/such/page").status_code == 404


def test_concurrent_visitors_do_not_see_each_others_cold_start_devices(app):
    alice, bob = visitor(app), visitor(app)
    token_a, selects = cold_start_form(alice)
    token_b, _ = cold_start_form(bob)
    assert token_a != token_b
    mine = alice.post("/new", data={"csrf": token_a, **{n: "5" for n in selects[:5]}}).get_data(as_text=True)
    assert recommended(mine)
    assert not recommended(bob.get("/new").get_data(as_text=True))  # Bob sees no device of his own yet
    theirs = bob.post("/new", data={"csrf": token_b, **{n: "1" for n in selects[-5:]}}).get_data(as_text=True)
    assert recommended(alice.get("/new").get_data(as_text=True)) == recommended(mine)
    assert recommended(bob.get("/new").get_data(as_text=True)) == recommended(theirs)
    # one visitor's form token does not work for another, nor does a form without one
    assert bob.post("/new", data={"csrf": token_a, selects[0]: "3"}).status_code == 400
    assert visitor(app).post("/new", data={selects[0]: "3"}).status_code == 400
    cookie = alice.get_cookie("fedrec_session")
    assert cookie.http_only and cookie.same_site == "Lax" and len(cookie.value) >= 32
    alice.post("/new/forget", data={"csrf": token_a})
    assert not recommended(alice.get("/new").get_data(as_text=True))


def test_consent_and_forget_buttons_act_on_the_device_side(app, monkeypatch):
    import fedrec.demo.app as serve_app

    calls = []

    class DeviceSide:  # records what the page asks of the device
        @staticmethod
        def set_consent(run_dir, user, train):
            calls.append(("consent", user, train))

        @staticmethod
        def erase_device(run_dir, user):
            calls.append(("erase", user))

    monkeypatch.setattr(serve_app, "device_side", lambda: DeviceSide)
    client = visitor(app)
    token = act_as(client, "7")
    reply = client.post("/device/7/consent", data={"csrf": token, "train": "0"})
    assert reply.status_code == 303 and reply.headers["Location"].endswith("/device/7#consent")
    assert client.post("/device/7/forget", data={"csrf": token}).status_code == 303
    assert client.post("/device/7/forget", data={}).status_code == 400  # no form token: refused
    assert client.post("/device/100000/forget", data={"csrf": token}).status_code == 404
    assert calls == [("consent", "7", False), ("erase", "7")]


def test_an_unexpected_error_is_one_line_on_the_page_not_a_traceback(app, monkeypatch):
    import fedrec.demo.app as serve_app

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(serve_app, "recommend", broken)
    client = visitor(app)
    act_as(client, "7")
    reply = client.get("/device/7")
    page = reply.get_data(as_text=True)
    assert reply.status_code == 500 and text_of(page, "error") == "internal error: RuntimeError: disk on fire"
    assert "Traceback" not in page and "second line" not in page


def test_a_compare_directory_serves_its_federated_run_with_the_central_reference(run, tmp_path):
    import shutil

    from fedrec.demo.demo import Demo

    shutil.copytree(run, tmp_path / "cmp" / "central")
    shutil.copytree(run, tmp_path / "cmp" / "federated")
    demo = Demo(tmp_path / "cmp")
    assert demo.paths.run == tmp_path / "cmp" / "federated" and demo.central_value > 0
    assert demo.forget_command("7") == f"fedrec forget --run {tmp_path / 'cmp' / 'federated'} --user 7"
    assert demo.example_users()[0] == "0" and len(demo.well_known(15)) == 15
    counts = np.bincount(demo.split.train.item, minlength=demo.split.n_items)
    assert counts[demo.well_known(1)[0]] == counts.max()  # the most-rated movie comes first


@pytest.mark.parametrize("args, expected", [
    (["--run", "nowhere"], "nowhere is not a directory"),
    (["--run", "."], "has no model.npz"),
    (["--port", "70000"], "70000 is not in the range"),
])
def test_serve_bad_input_is_one_line_exit_2(run, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    full = ["serve", "--run", str(run), *args] if "--run" not in args else ["serve", *args]
    result = CliRunner().invoke(cli, full)
    assert result.exit_code == 2 and expected in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_serve_on_a_port_in_use_is_one_line_exit_2(run):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--run", str(run), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_serve_prints_its_token_url_once_listening_and_stops_cleanly(run):
    """The real command: the printed URL carries a fresh token and is the way in; the bare address is refused,
    and nothing else the process prints carries the token."""
    import http.cookiejar

    command = [sys.executable, "-c", "from fedrec.cli.main import main; main()", "serve", "--run", str(run),
               "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        printed = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=([\w-]+)", line)
        assert printed, line
        base, token = printed.groups()
        assert len(token) >= 43 and token != TOKEN  # 32 bytes of OS entropy, URL-safe base64
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base, timeout=10)
        assert refused.value.code == 403 and refused.value.read().decode().count("\n") == 1
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(printed.group(0), timeout=10) as reply:  # the login's redirect, then the page
            assert reply.status == 200 and reply.url == base and 'id="pick-user"' in reply.read().decode()
        assert [c.name for c in jar] == [f"fedrec_session_{base.rsplit(':', 1)[1].strip('/')}"]
        assert token not in "".join(c.value for c in jar)
        process.send_signal(signal.SIGTERM)  # as `kill` does; Ctrl-C's SIGINT takes the same path
        # it first waits for the device pages' background imports (torch), which take >10 s on a loaded machine
        assert process.wait(timeout=30) == 0
        rest = process.stdout.read()
        assert "stopped" in rest and token not in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_new_device_on_implicit_feedback_fits_towards_what_it_watched():
    import torch

    from fedrec.demo.device import cold_start
    from fedrec.models.defaults import Hyper
    from fedrec.models.factors import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB
    from fedrec.models.mf import MF

    gen = torch.Generator().manual_seed(0)
    model = {ITEM_EMB: torch.randn(60, 4, generator=gen), ITEM_BIAS: torch.zeros(60), GLOBAL_BIAS: torch.tensor([0.0])}
    algorithm = MF(Hyper(dim=4, implicit=True, reg_user=0.001, reg_bias=0.001, train_negatives=4), 60, (1.0, 5.0))
    demo = SimpleNamespace(algorithm=algorithm, model=model, titles=[f"item {i}" for i in range(60)],
                           item_ids=np.arange(60))
    watched = np.argsort(-model[ITEM_EMB][:, 0].numpy())[:8]  # the items highest on factor 0
    fit = cold_start(demo, dict.fromkeys(watched.tolist(), 1.0), opt_in=False)  # the page's own fit, on the device
    logits = model[ITEM_EMB].numpy() @ fit.vector + fit.bias
    assert fit.vector[0] > 0 and logits[watched].mean() > np.delete(logits, watched).mean() + 1
    # it recommends by those logits, as they are (implicit feedback has no rating scale to clamp them to)
    shown = {int(r.item): r.score for r in fit.recommended}
    assert len(shown) == 10 and not set(shown) & set(watched.tolist())
    np.testing.assert_allclose(list(shown.values()), logits[list(shown)], rtol=1e-4, atol=1e-5)


def test_opting_out_and_forgetting_show_on_the_device_page(app):
    client = visitor(app)
    token = act_as(client, "12")
    before = client.get("/device/12").get_data(as_text=True)
    assert "opted out" not in text_of(before, "consent-status") and "erased" not in text_of(before, "forget-status")
    client.post("/device/12/consent", data={"csrf": token, "train": "0"})
    page = client.get("/device/12").get_data(as_text=True)
    status = text_of(page, "consent-status")
    assert "opted out" in status and "no update, no evaluation sums" in status and "uploads nothing" not in status
    assert len(recommended(page)) == 10  # still recommended to
    assert 'id="opt-back-in"' in page and 'id="opt-out"' not in page
    page = client.get(client.post("/device/12/forget", data={"csrf": token}).headers["Location"]).get_data(
        as_text=True)
    assert "erased" in text_of(page, "forget-status")
    assert text_of(page, "vector") == "erased" and text_of(page, "bytes-stored") == "0 bytes" and not recommended(page)


@pytest.mark.parametrize("exit_code, shown", [
    (0, "fedrec forget finished: rounds replayed: 3 (from round 2 to 5)"),
    (2, "The replay failed: error: cannot replay"),
])
def test_the_forget_replay_runs_in_the_background_and_its_report_shows(demo, monkeypatch, exit_code, shown):
    import time

    from fedrec.demo.app import create_app
    from fedrec.demo.demo import Demo

    monkeypatch.setattr(Demo, "can_replay", True)
    report = "rounds replayed: 3 (from round 2 to 5)" if exit_code == 0 else "error: cannot replay"
    fake = (f"import sys, time; time.sleep(0.5); assert sys.argv[1:] == ['forget', '--run', {str(demo.paths.run)!r}, "
            f"'--user', '9']; print('erased on its device'); print({report!r}); sys.exit({exit_code})")
    replaying = create_app(demo, TOKEN, replay_command=[sys.executable, "-c", fake])
    client = visitor(replaying)
    token = act_as(client, "9")
    other = visitor(replaying)  # another visitor, holding device 10
    other_token = act_as(other, "10")
    assert 'id="forget-replay-button"' in client.get("/device/9").get_data(as_text=True)
    assert client.post("/device/9/forget/replay", data={"csrf": token}).status_code == 303
    page = client.get("/device/9").get_data(as_text=True)
    assert "Replaying the federation without this user" in text_of(page, "forget-replay")
    assert '<meta http-equiv="refresh"' in page  # the page follows the replay without JavaScript
    assert "another replay is running" in text_of(
        other.post("/device/10/forget/replay", data={"csrf": other_token}).get_data(as_text=True), "error")
    for _ in range(100):
        page = client.get("/device/9").get_data(as_text=True)
        if "refresh" not in page:
            break
        time.sleep(0.1)
    assert shown in text_of(page, "forget-replay")
    assert ('id="forget-replay-button"' in page) == (exit_code != 0)  # a failed replay can be tried again


def test_rating_choices_follow_the_data_sets_scale():
    from fedrec.demo.app import _choices

    assert _choices((1.0, 5.0)) == ["1", "2", "3", "4", "5"]
    assert _choices((0.5, 5.0))[:3] == ["0.5", "1", "1.5"] and _choices((0.5, 5.0))[-1] == "5"


def test_only_the_visitor_who_claimed_a_device_sees_it_or_acts_on_it(app):
    alice, bob = visitor(app), visitor(app)
    token_a = act_as(alice, "20")
    token_b = act_as(bob, "20")  # taken: Bob's pick does not claim it
    for path, form in (("/device/20/consent", {"train": "0"}), ("/device/20/forget", {}),
                       ("/device/20/forget/replay", {}), ("/device/20/claim", {})):
        assert bob.post(path, data={"csrf": token_b, **form}).status_code == 403, path
    held_before = bob.get("/device/20").get_data(as_text=True)
    alice.post("/device/20/consent", data={"csrf": token_a, "train": "0"})
    alice.post("/device/20/forget", data={"csrf": token_a})
    assert "erased" in text_of(alice.get("/device/20").get_data(as_text=True), "forget-status")
    seen = bob.get("/device/20")
    page = seen.get_data(as_text=True)
    assert seen.status_code == 403 and "held by another visitor" in text_of(page, "held")
    assert page == held_before  # the holder's erasing and opting out changed nothing Bob can see
    assert not recommended(page) and 'id="vector"' not in page and 'id="consent"' not in page
    assert bob.get("/plot.png?user=20").status_code == 403
    # an unclaimed device: a button to claim it, nothing of its state
    page = bob.get("/device/21").get_data(as_text=True)
    assert 'id="claim-button"' in page and not recommended(page) and 'id="uploads"' not in page
    assert bob.post("/device/21/consent", data={"csrf": token_b, "train": "0"}).status_code == 403
    assert bob.post("/device/21/claim", data={"csrf": token_b}).status_code == 303
    assert 'id="opt-out"' in bob.get("/device/21").get_data(as_text=True)
    assert alice.get("/device/21").status_code == 403


def test_an_unclaimed_devices_page_reads_the_same_whatever_its_state(app, demo):
    from fedrec.personal import device_view

    client = visitor(app)
    plain = client.get("/device/23").get_data(as_text=True)
    device_view.set_consent(demo.paths.run, "22", False)  # e.g. fedrec consent, or an earlier server
    device_view.erase_device(demo.paths.run, "22")
    changed = client.get("/device/22").get_data(as_text=True)
    assert changed.replace("user 22", "user 23").replace("/device/22", "/device/23") == plain


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                          ("127.0.0.2", False), ("0.0.0.0", True), ("192.168.1.5", True),
                                          ("example.org", True)])
def test_serving_beyond_loopback_warns_in_one_line(host, warned):
    from fedrec.demo.server import host_warning

    line = host_warning(host)
    assert (line is not None) == warned
    assert line is None or ("stands in for every device" in line and "opted out or erased" in line and "\n" not in line
                            and "plain HTTP, so the token and session cookies cross the network" in line)


def test_a_dp_run_offers_no_replay_and_shows_the_bound(app, demo, monkeypatch):
    monkeypatch.setattr(demo, "federated", True)
    monkeypatch.setattr(demo, "cfg", dataclasses.replace(demo.cfg, dp="central", keep_checkpoints=True))
    monkeypatch.setattr(demo, "summary", {**demo.summary, "status": "completed",
                                          "privacy": {"epsilon": 2.5, "delta": 1e-5}})
    assert not demo.can_replay
    client = visitor(app)
    token = act_as(client, "24")
    page = client.get("/device/24").get_data(as_text=True)
    shown = text_of(page, "forget-replay")
    assert "does not replay" in shown and "epsilon 2.5 at delta 1e-05" in shown
    assert 'id="forget-replay-button"' not in page and "until" not in text_of(page, "forget-status")
    assert "epsilon 2.5" in text_of(client.post("/device/24/forget/replay", data={"csrf": token}).get_data(
        as_text=True), "error")


def test_a_visitor_holds_one_device_claiming_another_releases_the_first(app):
    alice, bob = visitor(app), visitor(app)
    token_a, token_b = act_as(alice, "30"), act_as(bob, "32")
    assert "claiming another releases this one" in text_of(alice.get("/device/30").get_data(as_text=True),
                                                            "claim-status")
    assert alice.post("/device/31/claim", data={"csrf": token_a}).status_code == 303
    assert 'id="opt-out"' in alice.get("/device/31").get_data(as_text=True)
    released = alice.get("/device/30").get_data(as_text=True)
    assert 'id="claim-button"' in released and 'id="opt-out"' not in released
    assert alice.post("/device/30/consent", data={"csrf": token_a, "train": "0"}).status_code == 403
    assert bob.post("/device/30/claim", data={"csrf": token_b}).status_code == 303  # another visitor can claim it
    assert 'id="opt-out"' in bob.get("/device/30").get_data(as_text=True)
    assert 'id="claim-button"' in bob.get("/device/32").get_data(as_text=True)  # Bob let go of 32 for it
    # a refused claim (the device is held) keeps the device the visitor holds
    assert alice.post("/device/30/claim", data={"csrf": token_a}).status_code == 403
    assert 'id="opt-out"' in alice.get("/device/31").get_data(as_text=True)


def test_post_forms_without_the_visitors_own_token_are_refused_and_change_nothing(app, demo, monkeypatch):
    import fedrec.demo.app as serve_app
    from fedrec.demo.demo import Demo

    calls = []

    class DeviceSide:
        set_consent = staticmethod(lambda run_dir, user, train: calls.append(("consent", user)))
        erase_device = staticmethod(lambda run_dir, user: calls.append(("erase", user)))

    monkeypatch.setattr(serve_app, "device_side", lambda: DeviceSide)
    monkeypatch.setattr(Demo, "can_replay", True)
    client, other = visitor(app), visitor(app)
    token, other_token = act_as(client, "40"), csrf(other.get("/").get_data(as_text=True))
    _, selects = cold_start_form(client)
    forms = {"/device/40/consent": {"train": "0"}, "/device/40/forget": {}, "/device/40/forget/replay": {},
             "/device/41/claim": {}, "/new": {n: "4" for n in selects[:5]}, "/new/forget": {}}
    for path, form in forms.items():
        for wrong in ({}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": other_token}, {"csrf": token[:-1]}):
            reply = client.post(path, data={**form, **wrong})
            assert reply.status_code == 400 and "out of date" in text_of(reply.get_data(as_text=True), "error"), path
    assert visitor(app).post("/device/41/claim", data={"csrf": token}).status_code == 400  # another session
    assert client.get("/device?user=41").status_code == 302  # a pick without the token claims nothing
    assert calls == [] and app.extensions["fedrec-replays"].status("40") is None
    assert not recommended(client.get("/new").get_data(as_text=True))
    assert other.post("/device/41/claim", data={"csrf": other_token}).status_code == 303  # 41 was still free
    assert client.post("/device/40/consent", data={"csrf": token, "train": "0"}).status_code == 303
    assert calls == [("consent", "40")]  # the same form with the visitor's own token is accepted


EXTERNAL = re.compile(r"""(?i)(?:\b(?:src|href|action|srcset|poster|data)\s*=\s*["']?|url\(\s*["']?|@import\s*["'])"""
                      r"""\s*(?:https?:|//)""")


def test_no_page_loads_anything_from_the_internet_or_runs_javascript(app):
    client = visitor(app)
    token = act_as(client, "50")
    _, selects = cold_start_form(client)
    replies = [client.get(path) for path in ("/", "/device/50", "/device/51", "/new", "/device/100000",
                                             "/no/such/page", "/static/style.css", "/plot.png")]
    replies += [client.post("/new", data={"csrf": token, selects[0]: "9"}),  # refused: a page with #error
                client.post("/new", data={"csrf": token, **{n: "4" for n in selects[:5]}}),  # the result page
                client.post("/device/50/consent", data={}), visitor(app).get("/device/50"),  # 400, 403
                app.test_client().get("/")]  # no session: the one-line 403
    assert {r.status_code for r in replies} == {200, 400, 403, 404}
    for reply in replies:
        body = reply.get_data(as_text=True) if reply.mimetype != "image/png" else ""
        assert not re.search(r"(?i)<script|javascript:|\son\w+\s*=", body), reply.request.path
        assert not EXTERNAL.search(body), reply.request.path
        policy = dict((d.split() + [""])[:2] for d in reply.headers["Content-Security-Policy"].split(";"))
        assert policy["script-src"] == "'none'" and policy["object-src"] == "'none'"
        assert policy["default-src"] == "'self'" and "http" not in reply.headers["Content-Security-Policy"]
    assert 'href="/static/style.css"' in replies[0].get_data(as_text=True)  # the one stylesheet: this server's
    assert EXTERNAL.search('<img src="https://x.org/a.png">') and EXTERNAL.search("a{background:url( //x.org/b)}")


def refused(reply) -> bool:
    """The gate's answer: one line of plain text, nothing of the page, no cookie."""
    from fedrec.demo.access import NO_ACCESS

    return (reply.status_code == 403 and reply.mimetype == "text/plain" and reply.get_data(as_text=True) ==
            NO_ACCESS + "\n" and "Set-Cookie" not in reply.headers)


def test_without_the_token_every_route_is_a_one_line_403(app):
    stranger = app.test_client()
    gets = ["/", "/device/7", "/device?user=7", "/new", "/static/style.css", "/plot.png", "/plot.png?user=7",
            "/no/such/page", "/?token=", "/?token=wrong", f"/?token={TOKEN[:-1]}", f"/?token={TOKEN}x",
            "/?token=%C3%A9"]  # a wrong token, empty, one short, one long, not ASCII
    posts = ["/device/7/consent", "/device/7/forget", "/device/7/claim", "/new", f"/device/7/claim?token={TOKEN}"]
    for path in gets:
        assert refused(stranger.get(path)), path
    for path in posts:
        assert refused(stranger.post(path, data={"csrf": "x", "train": "0"})), path
    # positive control: the same routes answer a visitor who came in with the token
    client = visitor(app)
    for path in ("/", "/device/7", "/static/style.css", "/plot.png", "/no/such/page"):
        reply = client.get(path)
        assert reply.status_code in (200, 404) and reply.mimetype != "text/plain", path


def test_the_token_opens_a_session_and_is_dropped_from_the_url_by_redirect(app, demo):
    client = app.test_client()
    login = client.get(f"/device/7?token={TOKEN}&x=1")
    assert login.status_code == 303 and login.headers["Location"] == "/device/7?x=1"
    assert login.headers["Cache-Control"] == "no-store" and TOKEN not in login.get_data(as_text=True)
    cookie = client.get_cookie("fedrec_session")
    assert cookie.http_only and cookie.same_site == "Lax" and TOKEN not in cookie.value
    page = client.get(login.headers["Location"])
    assert page.status_code == 200 and 'id="claim-button"' in page.get_data(as_text=True)
    assert page.headers["Referrer-Policy"] == "no-referrer"
    # the printed URL opened again keeps the session, and with it the device held
    act_as(client, "7")
    again = client.get(f"/?token={TOKEN}")
    assert again.status_code == 303 and again.headers["Location"] == "/" and "Set-Cookie" not in again.headers
    assert client.get_cookie("fedrec_session").value == cookie.value
    assert 'id="forget-button"' in client.get("/device/7").get_data(as_text=True)
    # the redirect stays on this server whatever the path
    for path, location in (("//evil.example/", "/evil.example/"), ("/device/a b", "/device/a%20b")):
        reply = app.test_client().get(f"/?token={TOKEN}", environ_overrides={"PATH_INFO": path})
        assert reply.status_code == 303 and reply.headers["Location"] == location, path


def test_a_chosen_visitor_cookie_never_becomes_the_victims_identity(app, demo, monkeypatch):
    """Fixation. On main the server adopted any 16-64 character cookie as the visitor id, so this script
    succeeded: plant a chosen id in the victim's browser (any page on any 127.0.0.1 port can set it,
    cookies ignore ports), let the victim claim a device, then send the same cookie: the victim's
    device page came back 200 with its forget form, and a consent post 303. Here ids are issued and
    signed by the server: the chosen cookie is never adopted, and the attacker gets the one-line 403.
    Positive control: a copy of the victim's own signed cookie is accepted (that is all that
    identifies a visitor), while an unsigned, tampered or foreign-signed copy of it is not."""
    import fedrec.demo.app as serve_app
    from fedrec.demo.app import create_app

    calls = []

    class DeviceSide:
        set_consent = staticmethod(lambda run_dir, user, train: calls.append(("consent", user)))
        erase_device = staticmethod(lambda run_dir, user: calls.append(("erase", user)))

    monkeypatch.setattr(serve_app, "device_side", lambda: DeviceSide)
    chosen = "fixed-visitor-" + "a" * 30
    victim = app.test_client()
    for name in ("fedrec_visitor", "fedrec_session"):  # main's cookie name, and this server's
        victim.set_cookie(name, chosen)
    assert victim.get(f"/?token={TOKEN}").status_code == 303
    signed = victim.get_cookie("fedrec_session").value
    session = app.session_interface.get_signing_serializer(app).loads(signed)
    assert set(session) == {"visitor"} and session["visitor"] != chosen  # a fresh id, the chosen one not adopted
    victim_token = act_as(victim, "7")
    assert 'id="forget-button"' in victim.get("/device/7").get_data(as_text=True)

    attacker = app.test_client()
    for name in ("fedrec_visitor", "fedrec_session"):
        attacker.set_cookie(name, chosen)
    assert refused(attacker.get("/device/7"))
    assert refused(attacker.post("/device/7/consent", data={"csrf": victim_token, "train": "0"}))
    # a token holder with the chosen cookie gets a fresh id too: the victim's device is held, nothing of it shown
    assert attacker.get(f"/?token={TOKEN}").status_code == 303
    held = attacker.get("/device/7")
    assert held.status_code == 403 and 'id="forget-button"' not in held.get_data(as_text=True)
    assert attacker.post("/device/7/consent", data={"csrf": victim_token, "train": "0"}).status_code == 400

    payload, signature = signed.rsplit(".", 1)
    other_key = create_app(demo, TOKEN)  # another server (another port, or an earlier start): its own key
    forgeries = {"the bare id, as main took it": session["visitor"], "unsigned": payload,
                 "tampered": payload + "." + signature[::-1],
                 "signed by another server": other_key.session_interface.get_signing_serializer(other_key).dumps(
                     session)}
    for what, value in forgeries.items():
        copy = app.test_client()
        copy.set_cookie("fedrec_session", value)
        assert refused(copy.get("/device/7")), what
        assert refused(copy.post("/device/7/consent", data={"csrf": victim_token, "train": "0"})), what
    assert calls == []
    copy = app.test_client()
    copy.set_cookie("fedrec_session", signed)
    assert 'id="forget-button"' in copy.get("/device/7").get_data(as_text=True)
    assert copy.post("/device/7/consent", data={"csrf": victim_token, "train": "0"}).status_code == 303
    assert calls == [("consent", "7")]


def claim_everything(app, users: list[str], token: str | None) -> tuple[int, int]:
    """The script from the review: for each device, a fresh client with a fresh id claims it; (claimed, refused
    logins). With `token` it logs in each time, as a token holder's script would."""
    import secrets

    claimed = rationed = 0
    for user in users:
        client = app.test_client()
        client.set_cookie("fedrec_visitor", secrets.token_urlsafe(32))  # main's cookie: any id was taken
        if token is not None:
            login = client.get(f"/?token={token}")
            rationed += login.status_code == 429
            if login.status_code != 303:
                continue
        form = re.search(r'name="csrf" value="([^"]+)"', client.get("/").get_data(as_text=True))
        reply = client.post(f"/device/{user}/claim", data={"csrf": form.group(1) if form else "x"})
        claimed += reply.status_code == 303
    return claimed, rationed


def test_a_script_cycling_fresh_ids_cannot_claim_the_devices(demo):
    """On main a script cycling fresh ids claimed 199 of 200 devices, after which a new visitor got 403
    everywhere. Without the token it claims none; with it, logins are rationed (NEW_SESSIONS_AT_ONCE, then one
    every NEW_SESSION_EVERY seconds) and a visitor holds one device, so it gets that many. Positive control: the
    same script where logins are not rationed takes every device, and a new visitor then can claim none."""
    from fedrec.demo.access import NEW_SESSION_EVERY, NEW_SESSIONS_AT_ONCE, Allowance
    from fedrec.demo.app import create_app

    users = [str(u) for u in demo.user_ids]
    now = [0.0]
    app = create_app(demo, TOKEN, new_sessions=Allowance(clock=lambda: now[0]))
    assert claim_everything(app, users, token=None) == (0, 0)
    assert len(users) == 80 and claim_everything(app, users, TOKEN) == (NEW_SESSIONS_AT_ONCE, 80 - NEW_SESSIONS_AT_ONCE)
    late = app.test_client()
    rationed = late.get(f"/?token={TOKEN}")
    assert rationed.status_code == 429 and rationed.mimetype == "text/plain"
    assert rationed.get_data(as_text=True).count("\n") == 1 and rationed.headers["Retry-After"] == "10"
    assert late.get("/").status_code == 403  # no session was issued
    now[0] += NEW_SESSION_EVERY
    assert claim_everything(app, users[-1:], TOKEN) == (1, 0)  # after the wait a new visitor gets a free device

    unrationed = create_app(demo, TOKEN, new_sessions=Allowance(at_once=10**6))
    assert claim_everything(unrationed, users, TOKEN) == (80, 0)
    newcomer = visitor(unrationed)
    assert all(newcomer.get(f"/device/{u}").status_code == 403 for u in users)  # every device held
