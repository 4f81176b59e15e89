"""Benchmarks of fhir-bridge: ``python -m bench [part ...] [--quick]`` (or ``bash dev.sh bench``).

Every figure is measured against a baseline taken in the same run, on the same machine, a few seconds apart,
because the machines we run on are shared and noisy: the ratio is the figure, the absolute numbers are there
for reference. Parts (BENCHMARKS.md has the results and the commands):

* ``pull``   case pull + package vs a bare concurrent httpx script and a sequential fhirpy loop (:mod:`bench.pull`);
* ``memory`` peak RSS of ``fhir-bridge pull`` on a 2 GB case vs a small case (:mod:`bench.pull`);
* ``api``    requests/s and latency of DiagnosticReport read and search vs ``/healthz`` (:mod:`bench.api`);
* ``audit``  chained audit appends/s vs a bare Redis XADD (:mod:`bench.audit`);
* ``sync``   ``sync refresh`` over open cases, source requests counted (:mod:`bench.sync`; needs issue 8).

Everything real: the sandbox, the API and the pull run as their own processes on free ports, each Redis is a
private ``redis-server`` the harness starts; nothing touches a Redis it did not start.
"""
