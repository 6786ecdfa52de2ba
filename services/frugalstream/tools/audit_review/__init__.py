"""`frugalstream audit review | export | import`: people's verdicts on audits, in a browser or a CSV file.

Both ways write `ReviewVerdict`s to `llm.audits.reviews` tied to the audit id, its tenant and the hash of the
two answers shown, so the audit service counts a person's verdict in place of the machine's.
"""
