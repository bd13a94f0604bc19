"""`autojudge eval`: accuracy and speed of decoding modes, from resumable per-problem rows."""
