"""The report floor: scores and rankings (``scoring``), figures, the HTML leaderboard, the
``effllm recommend`` choice and the ``effllm compare`` ratios, all read from the tidy results
table. Nothing here runs a model, and nothing below (``models/``, ``measure/``, ``data/``,
``axes/``) imports it."""
