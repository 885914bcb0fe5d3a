"""Whisper speech recognition: `model`, `ct2` (CTranslate2 reader), `assets`, `build`, the runtime
(`transcriber`, `streaming`) and what the device agent does with it (`device`)."""
