"""Recipes shipped for the built-in models: what `compress` runs on them when no setting is given
(:func:`svdcompress.zoo.shipped_recipe`)."""
