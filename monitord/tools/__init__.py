"""The command line's tools beside the daemon: classify, timeline, eval/enrol, bench, tail."""
