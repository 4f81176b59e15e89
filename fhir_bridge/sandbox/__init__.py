"""The synthetic national-record source: a strict PDSm Document Recipient and MHD Document Responder over
real HTTP, for the demo, the tests and the benchmarks."""
