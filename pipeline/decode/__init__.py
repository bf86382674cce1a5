"""Reading video: probing (`probe`, `media`), decoding in isolated child processes with a timeout
(`isolation`, `backends`), and picking the sampled frames of a clip or a whole video by their
presentation timestamps (`range_decode`, `sampling`)."""
