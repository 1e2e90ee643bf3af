"""The bundled sample, installed as ``kdcore.sample_data`` (see ``sample_bundle_path``)."""
