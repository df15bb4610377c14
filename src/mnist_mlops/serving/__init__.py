"""Serving: the BentoML service, image conversion, packaging into a Bento, the drawing page."""
