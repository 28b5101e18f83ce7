"""Audio on its way through ffmpeg: container sniffing, the process, spools, the window."""
