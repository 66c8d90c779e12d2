"""Local stand-in for Deepvue's bulk-verification API and the S3 bucket holding its output files.

Deepvue publishes no sandbox, so tests, the demo and the benchmark talk to this asyncio
server instead. It imitates what /work/shared/deepvue/API-NOTES.md documents: form-based
``POST /v1/authorize`` returning an HS256 JWT, the two auth headers (``Authorization: Bearer``
and ``x-api-key`` = client secret), FastAPI-style ``{"detail": ...}`` errors, per-key rate
limits, the batch-status envelope, presigned S3-style output URLs that expire, and the UPI
batch submission endpoint. It only ever binds loopback.

Status answers depend on the request_id's prefix, so one server can play every scenario:

=============  ==========================================================================
prefix         behaviour of ``GET /v1/verification/batch-processing-status``
=============  ==========================================================================
(none)         in progress (``data.status`` 201, URL null) until ``completion_delay`` has
               passed since the first status call for the id, then completed
               (``data.status`` 200, a freshly signed ``batch_output_file_url``).
``fail-``      in progress, then ``data.status`` 500 "batch processing failed", URL null.
``invalid-``   HTTP 400 ``{"detail": "Invalid request_id"}``.
``missing-``   HTTP 404 ``{"detail": "request_id not found"}``.
``flaky-``     every odd-numbered status call for the id (1st, 3rd, ...) answers 503
               "Source Unavailable"; the others behave as the default.
``garbage-``   the first 2 calls answer HTTP 200 with the HTML body
               ``<html>upstream gateway</html>``; then the default.
``nothttp-``   the first 2 calls are answered with a line that is not HTTP (an SSH banner),
               then the connection is closed; then the default.
``slow-``      completes after 5 x ``completion_delay``.
``trunc-``     default, but the first GET of the output file is cut (connection closed)
               after half of the response body; later requests, Range resumes included,
               work.
``expire-``    default, but the first output URL handed out is already expired.
``xlsx-``      the output URL path ends in ``.xlsx`` instead of ``.csv``.
``big-``       the output file is ``big_file_size`` bytes instead of ``file_size``.
``ratelimit-`` every status call answers 429 with ``Retry-After: 1``.
``trickle-``   default, but the output file is sent at about 2 KiB/s (256-byte chunks with
               a pause between them): exercises the tracker's overall download deadline.
``stall-``     default, but the output file response sends its headers and first 1 KiB,
               then no byte for an hour (the wait ends early on server shutdown or when
               the client goes away).
``badurl-``    default, but the completed answer carries a URL the tracker must refuse
               before connecting. The simulator never fetches any of these itself:
``badurl-http-``      ``http://bulk-data-processing.s3.ap-south-1.amazonaws.com/...``
                      (plain http to a non-loopback host).
``badurl-file-``      ``file:///etc/passwd``.
``badurl-userinfo-``  the simulator's own signed URL with ``user:pass@`` before the host.
``badurl-host-``      ``https://evil.example.com/...``.
``badurl-metadata-``  ``http://169.254.169.254/latest/meta-data/``.
``badurl-redirect-``  the simulator's own signed file URL, which answers 302 to
                      ``http://169.254.169.254/latest/meta-data/`` (recorded in
                      ``downloads`` with status 302 and counted in ``redirects_served``).
``huge-``      every status call answers HTTP 200 with a valid-looking JSON envelope padded
               to ``huge_answer_size`` bytes (64 MiB), streamed (counted in
               ``errors_served``).
``gzipbomb-``  every status call answers HTTP 200, ``Content-Encoding: gzip``, a few hundred
               KiB on the wire that inflate to ``gzip_bomb_size`` bytes (256 MiB) of
               valid-looking JSON (counted in ``errors_served``).
``endless-``   default, but the output file is sent chunked and never ends (until the
               client goes away or the server stops).
``badetag-``   default, but the output file's ETag is an MD5 that its bytes do not have.
``unframed-``  default, but a full (200) answer for the output file is HTTP/1.0-style: no
               Content-Length, no chunked encoding, the end of the body is the close. At
               random (the ``seed``), half of them close early at a random offset; Range
               answers (206) are framed as usual.
``unframed-noetag-``  as ``unframed-``, and the file has no ETag at all, so nothing can
                      confirm that a body is complete.
=============  ==========================================================================

Order of checks for a status call: ``latency`` sleep, auth (401/403), missing
``request_id`` (422), ``throttle_first`` (429 with ``Retry-After: throttle_retry_after``
for the first N status calls since start or the last reset, whatever their id), configured
rate limits (429, no Retry-After), ``error_rate`` (503), then the prefix table above.

Output files (``GET /upi-basic-batch-output-files/<id>.<csv|xlsx>``) are deterministic CSV
(see :func:`output_bytes`), streamed in 64 KiB chunks with a strong ETag, ``Accept-Ranges``,
single-range ``Range`` support and ``If-Range``. As on S3, the ETag of a file up to
``MULTIPART_THRESHOLD`` (64 MiB) is the quoted MD5 of its bytes (a single-part upload);
a bigger file's is that of a multipart upload, ``"<hex>-<parts>"``, which is no MD5. Test hooks: ``GET /_sim/stats`` and
``POST /_sim/reset``. In the stats, ``status_calls`` counts every authenticated status call
that named a request_id (429 and 503 answers included); ``rate_limited`` counts 429s
(``throttle_first``, limits and the ``ratelimit-`` prefix); ``errors_served`` counts injected
faults (``error_rate`` and ``flaky-`` 503s, ``garbage-`` HTML); ``redirects_served`` counts
``badurl-redirect-`` 302s; ``downloads`` keeps the newest 10,000 requests.
``overlapping_status_calls`` counts the status calls that arrived while another status call
for the same request_id was still being answered (``latency`` makes answers take time), and
``overlapping_by_id`` says how many per request_id: a client that never asks twice at once
about one batch keeps both at zero. Only calls counted in ``status_calls`` count as
overlapping, but every in-flight call for the id (authenticated or not) is overlapped.
"""

from __future__ import annotations

from tracker.simulator.app import build_app
from tracker.simulator.config import SimulatorConfig
from tracker.simulator.content import (
    MULTIPART_THRESHOLD,
    expected_md5,
    expected_sha256,
    expected_size,
    output_bytes,
)
from tracker.simulator.serving import SimulatorHandle, running_simulator, serve_forever

__all__ = [
    "MULTIPART_THRESHOLD",
    "SimulatorConfig",
    "SimulatorHandle",
    "build_app",
    "expected_md5",
    "expected_sha256",
    "expected_size",
    "output_bytes",
    "running_simulator",
    "serve_forever",
]
