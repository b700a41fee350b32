"""Cold-start data: grounded reasoning traces written by a teacher (:mod:`.template` offline, :mod:`.teacher`
through an OpenAI-compatible API), filtered (:mod:`.filter`) and written as a dataset (:mod:`.synthesize`)."""
