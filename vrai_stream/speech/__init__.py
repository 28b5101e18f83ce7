"""Speech to text: transcribers, summaries, languages and transcript formats."""
