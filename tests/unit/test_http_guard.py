"""The HTTP API's Host, Origin and Content-Type rules (issue 23, item 9),
apart from any socket."""

from __future__ import annotations

import pytest

from pulsed.http.guard import Authority, HostPolicy
from pulsed.http.messages import HttpError


def refusal(check, *args) -> HttpError:
    with pytest.raises(HttpError) as caught:
        check(*args)
    return caught.value


@pytest.mark.parametrize("text, parsed", [
    ("localhost:8080", Authority("localhost", 8080)),
    ("Example.COM", Authority("example.com", None)),
    ("[::1]:80", Authority("::1", 80)),
    ("[::1]", Authority("::1", None)),
    ("127.0.0.1:65535", Authority("127.0.0.1", 65535)),
    ("", None), (":8080", None), ("host:0", None), ("host:99999", None), ("host:x", None),
    ("[::1", None), ("[::1]x", None),
])
def test_authorities_parse(text, parsed):
    assert Authority.parse(text) == parsed


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080",
                                  "localhost:9000"])
def test_loopback_names_are_served_on_loopback(host):
    HostPolicy("127.0.0.1").check_host({"Host": host})


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "127.0.0.2:8080",
                                  "localhost.attacker.example", "10.0.0.5:8080"])
def test_other_names_are_misdirected(host):
    error = refusal(HostPolicy("127.0.0.1").check_host, {"Host": host})
    assert (error.status, error.field) == (421, "Host")
    assert "api.allowed_hosts" in error.message


@pytest.mark.parametrize("headers", [{}, {"Host": ""}, {"Host": "a, b"}, {"Host": "a:b:c"}])
def test_a_missing_or_malformed_host_is_400(headers):
    error = refusal(HostPolicy("127.0.0.1").check_host, headers)
    assert (error.status, error.field) == (400, "Host")


def test_allowed_hosts_add_names_with_or_without_a_port():
    policy = HostPolicy("127.0.0.1", allowed_hosts=("pulse.internal", "api.example:8443"))
    policy.check_host({"Host": "pulse.internal"})
    policy.check_host({"Host": "Pulse.Internal:8080"})
    policy.check_host({"Host": "api.example:8443"})
    assert refusal(policy.check_host, {"Host": "api.example:8080"}).status == 421
    HostPolicy("127.0.0.1", allowed_hosts=("*",)).check_host({"Host": "anything.example"})


def test_a_wildcard_listen_serves_ip_addresses_but_not_other_names():
    policy = HostPolicy("0.0.0.0")
    policy.check_host({"Host": "10.1.2.3:8080"})
    policy.check_host({"Host": "[fe80::1]:8080"})
    assert refusal(policy.check_host, {"Host": "attacker.example:8080"}).status == 421


def write(headers, *, method="POST", has_body=True):
    return HostPolicy("127.0.0.1").check_write(method, {"Host": "localhost:8080", **headers},
                                               has_body)


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost:3000", "null",
                                    "http://127.0.0.1:8080", "file://", "http://localhost:8080/x"])
def test_a_write_from_another_origin_is_403_naming_origin(origin):
    error = refusal(write, {"Origin": origin, "Content-Type": "application/json"})
    assert (error.status, error.code, error.field) == (403, "forbidden", "Origin")


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_write_a_browser_calls_cross_site_is_403(site):
    error = refusal(write, {"Sec-Fetch-Site": site, "Content-Type": "application/json"})
    assert (error.status, error.field) == (403, "Sec-Fetch-Site")


@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json"},
    {"Content-Type": "application/json; charset=utf-8"},
    {},  # no Content-Type: a script's body
    {"Content-Type": "application/x-www-form-urlencoded"},  # curl -d, no Origin
    {"Origin": "http://localhost:8080", "Content-Type": "application/json"},  # our page
    {"Origin": "https://localhost:8080", "Content-Type": "application/json"},  # behind TLS
    {"Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"},
])
def test_json_writes_from_here_and_curl_are_let_through(headers):
    write(headers)


@pytest.mark.parametrize("headers", [
    {"Content-Type": "text/plain"},
    {"Content-Type": "multipart/form-data; boundary=x"},
    {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://localhost:8080"},
    {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"},
])
def test_bodies_a_browser_form_can_send_are_415(headers):
    error = refusal(write, headers)
    assert (error.status, error.code, error.field) == (415, "unsupported_media_type",
                                                       "Content-Type")


def test_reads_and_bodiless_writes_skip_the_content_type_rule():
    write({"Origin": "http://evil.example"}, method="GET")
    write({"Content-Type": "text/plain"}, has_body=False)
