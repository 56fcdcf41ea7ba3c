"""The emoji world: named pictures, alone or in pairs, placed and sized as a caption asks.

catalogue.py   the pictures a data folder holds: names, categories, image files
"""
