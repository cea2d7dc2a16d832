"""What an instance does with the lease: record completions, elect, and run a leadership term.

The ready view, the term that commits, the election loop, the sweeper and the lease alarm. May
import every layer below it; never ``shared.web`` or ``shared.wiring``.
"""
