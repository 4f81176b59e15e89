"""The case itself, from request to package: what a request must say (intake, worklist), what is never
forwarded (selection), the document Bundle and its signature (packaging, signature), the Task's states
(tasks), deadlines and sync watermarks."""
