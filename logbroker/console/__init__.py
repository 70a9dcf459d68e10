"""`logbroker console`: a small web UI over a cluster, talking to it only as a client (Admin, Consumer).

- markup.py: HTML built with autoescaping (every value escaped unless it is already `Markup`);
- views.py: pure view models: lag history (bounded), partition rates, record value rendering;
- pages.py: the pages as HTML (server-rendered, inline SVG chart, no script);
- reader.py: the cluster reads, each bounded in time, and the background lag/offset sampler;
- server.py: routing on the standard library's http.server, errors as a page;
- command.py: the `console` command's flags.
"""
