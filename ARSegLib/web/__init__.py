"""ARSeg in the browser: `arseg view` serves a review page drawn by Slicer's own views (trame-slicer).

catalog.py    the volumes the page may open (the command line's files and folders; keys, never paths)
inference.py  the inference client: ARSeg's persistent worker process, as in Slicer
review.py     what the page does to the scene: open, run at a point, write ARSeg's MRML nodes, scales, files
app.py        the trame app: views, panel, click -> run -> overlay
serve.py      `arseg view`: rendering set-up, loopback by default, start

Needs the `web` extra (trame-slicer[standalone]); nothing here imports Qt.
"""
