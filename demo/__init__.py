"""`fedrec serve`: a local web page showing one device's side of a finished run.

demo.py loads the run once (global item model, data, titles, metrics); device.py is what a
device computes (its view, its recommendations, a cold-start fit); plot.py draws the
federation's accuracy and privacy budget; replay.py runs `fedrec forget` in the background;
access.py lets in only whoever opened the printed URL with its token; claims.py says which
visitor acts as which device; app.py is the Flask app; server.py runs it.
"""
