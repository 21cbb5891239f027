"""Fast, in-process tests of one piece: the wire (codec, framing, crypto, session), config,
the store, resolvers, links and peers over memory streams. A few spawn a plain Python writer
where a second process on the same file is the point; none starts a node."""
