"""The shapes world: a tiny, exactly specified picture world that every FFCLIP stage is trained on here.

`scenes` renders the specification, `captions` describes scenes and asks for edits in many phrasings, `judge` reads
the attributes back from pixels.
"""
