"""Conversion: build a model by name, plan and apply the surgery, start from trained weights.

Also the settings schema of a conversion, saved models (rebuilt by name), the authors' importer
and the shape pass the surgery needs.
"""
