"""Remote reward client against a tiny HTTP server on 127.0.0.1 started by the test."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards import RemoteReward, RemoteRewardConfig, RewardError, combine, get_reward

TOKEN = "s3cret-token-value"


class Server:
    """Answers POSTs from a queue of planned responses; records every request."""

    def __init__(self):
        self.requests = []
        self.plan = []  # (status, body_bytes, delay_s) per request; the last one repeats
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                outer.requests.append({"body": json.loads(self.rfile.read(length)),
                                       "auth": self.headers.get("Authorization")})
                status, body, delay = outer.plan[min(len(outer.requests), len(outer.plan)) - 1]
                if body is None:  # score the request: length of each completion
                    payload = outer.requests[-1]["body"]
                    body = json.dumps({"rewards": [float(len(c)) for c in payload["completions"]]}).encode()
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


def client(server, **fields):
    return RemoteReward(url=server.url, backoff_s=0.01, backoff_max_s=0.02, timeout_s=2.0, **fields)


def test_round_trip_with_columns_and_batches(server):
    server.plan = [(200, None, 0.0)]
    reward = client(server, batch_size=2)
    scores = reward(["p0", "p1", "p2"], ["a", "bb", "ccc"], answer=["1", "2", "3"], trainer_state=object(), step=7)
    assert scores == [1.0, 2.0, 3.0]
    assert [r["body"] for r in server.requests] == [
        {"prompts": ["p0", "p1"], "completions": ["a", "bb"], "answer": ["1", "2"], "step": 7},
        {"prompts": ["p2"], "completions": ["ccc"], "answer": ["3"], "step": 7},
    ]  # trainer_state is not JSON-serialisable and is left out


def test_chosen_columns_only(server):
    server.plan = [(200, None, 0.0)]
    client(server, columns=["answer"])(["p"], ["abc"], answer=["x"], other=["y"])
    assert server.requests[0]["body"] == {"prompts": ["p"], "completions": ["abc"], "answer": ["x"]}
    with pytest.raises(RewardError, match=r"columns \['missing'\] are not in the batch"):
        client(server, columns=["missing"])(["p"], ["abc"])


def test_retries_5xx_then_succeeds(server, caplog):
    server.plan = [(503, b"busy", 0.0), (500, b"oops", 0.0), (200, None, 0.0)]
    with caplog.at_level(logging.WARNING, logger="rewards.remote"):
        assert client(server, max_retries=3)(["p"], ["abcd"]) == [4.0]
    assert len(server.requests) == 3
    assert "attempt 1 failed (HTTP 503" in caplog.text and "attempt 2 failed (HTTP 500" in caplog.text


def test_gives_up_after_retries_with_status_url_and_body(server):
    server.plan = [(502, b'{"error": "upstream down"}', 0.0)]
    with pytest.raises(RewardError) as info:
        client(server, max_retries=2)(["p"], ["a"])
    message = str(info.value)
    assert "after 3 attempt(s)" in message and "HTTP 502" in message and server.url in message
    assert "upstream down" in message
    assert len(server.requests) == 3


def test_client_error_is_not_retried(server):
    server.plan = [(400, b"bad field 'completions'", 0.0)]
    with pytest.raises(RewardError, match=r"returned HTTP 400 Bad Request; body: \"bad field 'completions'\""):
        client(server, max_retries=3)(["p"], ["a"])
    assert len(server.requests) == 1


def test_timeout_is_retried_then_reported(server):
    server.plan = [(200, None, 1.0)]
    reward = RemoteReward(url=server.url, timeout_s=0.2, max_retries=1, backoff_s=0.0)
    with pytest.raises(RewardError, match="failed after 2 attempt"):
        reward(["p"], ["a"])
    assert len(server.requests) == 2


def test_connection_refused_is_retried():
    probe = Server()
    url = probe.url
    probe.close()  # nothing listens there any more
    reward = RemoteReward(url=url, max_retries=2, backoff_s=0.01)
    with pytest.raises(RewardError, match=r"failed after 3 attempt\(s\): URLError: \[Errno 111\] Connection refused"):
        reward(["p"], ["a"])


def test_bad_responses(server):
    server.plan = [(200, b"<html>", 0.0)]
    with pytest.raises(RewardError, match="answered non-JSON: '<html>'"):
        client(server)(["p"], ["a"])
    server.plan = [(200, b'{"rewards": [1.0]}', 0.0)]
    with pytest.raises(RewardError, match=r"must answer \{'rewards': \[2 numbers\]\}"):
        client(server)(["p", "q"], ["a", "b"])


def test_token_from_environment_is_sent_and_never_shown(server, monkeypatch, caplog):
    monkeypatch.setenv("GRPO_TEST_REWARD_TOKEN", TOKEN)
    server.plan = [(503, b"busy", 0.0), (401, b"denied", 0.0)]
    reward = client(server, token_env="GRPO_TEST_REWARD_TOKEN", max_retries=2)
    with caplog.at_level(logging.DEBUG, logger="rewards.remote"), pytest.raises(RewardError) as info:
        reward(["p"], ["a"])
    assert [r["auth"] for r in server.requests] == [f"Bearer {TOKEN}"] * 2
    assert TOKEN not in str(info.value) and TOKEN not in caplog.text and TOKEN not in repr(reward.config)
    monkeypatch.delenv("GRPO_TEST_REWARD_TOKEN")
    with pytest.raises(RewardError, match="environment variable 'GRPO_TEST_REWARD_TOKEN' .* is not set"):
        reward(["p"], ["a"])


def test_credentials_in_url_are_redacted(server):
    server.plan = [(404, b"nope", 0.0)]
    url = server.url.replace("http://", "http://user:pw@")
    with pytest.raises(RewardError) as info:
        RemoteReward(url=url, max_retries=0)(["p"], ["a"])
    assert "pw" not in str(info.value) and "user" not in str(info.value)


def test_config_validation():
    with pytest.raises(ValueError, match="url must be an http"):
        RemoteRewardConfig(url="ftp://example.org")
    with pytest.raises(ValueError, match="max_retries must be an integer >= 0"):
        RemoteRewardConfig(url="http://127.0.0.1:1", max_retries=-1)
    with pytest.raises(ValueError, match="must not carry credentials"):
        RemoteRewardConfig(url="http://127.0.0.1:1", headers={"Authorization": "Bearer x"})


def test_registered_and_combinable(server):
    server.plan = [(200, None, 0.0)]
    wr = combine({"remote": get_reward("remote", url=server.url), "fmt": "format"}, weights={"remote": 0.5})
    out = wr(["p", "q"], ["<think>a</think><answer>1</answer>", "xy"])
    assert out.breakdown == {"remote": [34.0, 2.0], "fmt": [1.0, 0.0]}
    assert out.total == [18.0, 1.0]
