"""press-play: the OmniCoder command line (generate, chat, eval; a tour of the default model)."""
