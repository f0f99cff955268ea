package agent

import (
	"context"
	"sync"
	"time"
)

// Dump scheduling. A node's checkpoint writes are bounded by what the node can absorb: CRIU's
// copying and the checksums need CPU, the images need the volume's write bandwidth. More dumps at
// once than that only lengthen every freeze (each app is stopped for its whole dump) without
// finishing the drain sooner. Measured on the 2-core test machine (BenchmarkDrainDumps, 8 apps of
// 256 MiB asked at once, real CRIU; ranges in docs/agent.md): past 2 at once the drain got no
// faster, while the median freeze went from 0.4–0.6 s (1 at once) to 0.8–1.7 s (4) and 1–11 s
// (8). The knee is machine-specific (cores, volume), so it is found at run time.
//
// The scheduler therefore climbs: it starts at Min dumps at once and, while dumps are waiting,
// measures the node's throughput at each level (bytes per second of the dumps that ran at that
// level). It adds a dump while the last step raised the throughput by at least stepGain, and
// takes one back when the level it is at did not beat the one below by that much. Max
// (--max-concurrent-dumps) caps it. Estimates older than forgetAfter are dropped: the next drain
// probes again (another volume, other load).

const (
	stepGain    = 1.10
	forgetAfter = 10 * time.Minute
	ewmaWeight  = 0.5 // of a new sample
)

// schedConfig bounds how many dumps run at once on the node.
type schedConfig struct {
	// Max is the most dumps at once (--max-concurrent-dumps); Min the level it starts at and the
	// fewest it goes down to (Min == Max: a fixed limit).
	Max, Min int
	Now      func() time.Time
	// Changed is told the limit, the dumps waiting and the throughput at the limit after every
	// change (metrics); called with the scheduler's lock held.
	Changed func(limit, waiting int, bytesPerSec float64)
}

func defaultSchedConfig() schedConfig { return schedConfig{Max: DefaultMaxConcurrentDumps, Min: 1} }

// DefaultMaxConcurrentDumps is --max-concurrent-dumps' default: the ceiling of the climb. On the
// measured machine the throughput stopped growing at 2; 4 leaves room for nodes with more cores
// or slower volumes, where the climb finds its own knee.
const DefaultMaxConcurrentDumps = 4

// scheduler hands out dump slots by urgency, then in arrival order, adapts the number of slots
// to the node's measured throughput and tells a waiting dump its place.
type scheduler struct {
	cfg schedConfig

	mu      sync.Mutex
	limit   int
	running int
	queue   []*slotWaiter // by urgency, then FIFO
	levels  map[int]*levelRate
}

// levelRate is the node's measured throughput with n dumps at once.
type levelRate struct {
	bytesPerSec float64
	samples     int
	at          time.Time
}

// urgency orders the queue: a more urgent dump goes before every less urgent one waiting, in
// arrival order within the same urgency.
type urgency int

const (
	// urgencyPeriodic: a periodic checkpoint; the app runs on, nothing is lost by waiting.
	urgencyPeriodic urgency = iota
	// urgencyEviction: an eviction or Job suspend; its caller retries (429) until the dump is done.
	urgencyEviction
	// urgencyTermination: the pod got SIGTERM and its grace period runs: the kubelet kills the
	// app when it ends, dumped or not.
	urgencyTermination
)

// slotWaiter is one dump waiting for a slot.
type slotWaiter struct {
	ready   chan struct{}
	urgency urgency
}

// grant is a slot held: the level it was granted at, and whether dumps were waiting when it was
// granted or when it ended (the node was saturated, so the dump's rate says what the level can
// do; a lone dump says nothing about more at once).
type grant struct {
	level     int
	saturated bool
}

func newScheduler(cfg schedConfig) *scheduler {
	if cfg.Max <= 0 {
		cfg.Max = 1
	}
	if cfg.Min <= 0 || cfg.Min > cfg.Max {
		cfg.Min = min(1, cfg.Max)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &scheduler{cfg: cfg, limit: cfg.Min, levels: map[int]*levelRate{}}
}

// acquire waits for w's slot; w (made by enqueue) is the caller's place. The returned release
// must be called once with what the dump wrote and how long it held the slot.
func (s *scheduler) acquire(ctx context.Context, w *slotWaiter) (func(bytes int64, took time.Duration), error) {
	var g grant
	select {
	case <-w.ready:
		s.mu.Lock()
		g = grant{level: s.limit, saturated: len(s.queue) > 0}
		s.mu.Unlock()
	case <-ctx.Done():
		s.mu.Lock()
		defer s.mu.Unlock()
		select {
		case <-w.ready: // granted meanwhile: give it back
			s.running--
			s.dispatch()
		default:
			s.remove(w)
			s.dispatch()
		}
		return nil, ctx.Err()
	}
	var once sync.Once
	return func(bytes int64, took time.Duration) {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.running--
			g.saturated = g.saturated || len(s.queue) > 0
			s.observe(g, bytes, took)
			s.dispatch()
		})
	}, nil
}

// enqueue puts a dump in the queue after every dump at least as urgent (granted at once when a
// slot is free).
func (s *scheduler) enqueue(u urgency) *slotWaiter {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := &slotWaiter{ready: make(chan struct{}), urgency: u}
	s.insert(w)
	s.dispatch()
	return w
}

// promote raises a waiting dump's urgency (a pod asked to checkpoint for an eviction gets SIGTERM
// while it waits) and moves it up accordingly; a dump holding a slot is left alone.
func (s *scheduler) promote(w *slotWaiter, u urgency) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w.urgency >= u {
		return
	}
	for _, q := range s.queue {
		if q == w {
			s.remove(w)
			w.urgency = u
			s.insert(w)
			return
		}
	}
}

// insert places w after the last waiting dump at least as urgent. Called with mu held.
func (s *scheduler) insert(w *slotWaiter) {
	i := len(s.queue)
	for i > 0 && s.queue[i-1].urgency < w.urgency {
		i--
	}
	s.queue = append(s.queue, nil)
	copy(s.queue[i+1:], s.queue[i:])
	s.queue[i] = w
}

// place is how many dumps are ahead of w (running, then waiting before it), and the current
// limit; ahead < 0 once w holds a slot (or left).
func (s *scheduler) place(w *slotWaiter) (ahead, running, limit int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, q := range s.queue {
		if q == w {
			return s.running + i, s.running, s.limit
		}
	}
	return -1, s.running, s.limit
}

// observe records a finished dump's rate at its level and moves the limit. Called with mu held.
func (s *scheduler) observe(g grant, bytes int64, took time.Duration) {
	if !g.saturated || g.level != s.limit || bytes <= 0 || took <= 0 || s.cfg.Min == s.cfg.Max {
		return
	}
	now := s.cfg.Now()
	for n, l := range s.levels {
		if now.Sub(l.at) > forgetAfter {
			delete(s.levels, n)
		}
	}
	// With n dumps sharing the node, each runs at about 1/n of its throughput.
	sample := float64(g.level) * float64(bytes) / took.Seconds()
	l := s.levels[g.level]
	if l == nil {
		l = &levelRate{bytesPerSec: sample}
		s.levels[g.level] = l
	} else {
		l.bytesPerSec = (1-ewmaWeight)*l.bytesPerSec + ewmaWeight*sample
	}
	l.samples++
	l.at = now
	if l.samples < g.level {
		return // one round of the level first: the first dumps of a level overlap the previous one
	}
	s.limit = s.nextLimit(s.limit)
}

// nextLimit climbs while a step up paid and steps back when the current level does not beat the
// one below.
func (s *scheduler) nextLimit(n int) int {
	cur := s.levels[n]
	if below := s.levels[n-1]; n > s.cfg.Min && below != nil && cur.bytesPerSec < stepGain*below.bytesPerSec {
		s.resetLevel(n - 1)
		return n - 1
	}
	above := s.levels[n+1]
	if n < s.cfg.Max && (above == nil || above.bytesPerSec >= stepGain*cur.bytesPerSec) {
		s.resetLevel(n + 1)
		return n + 1
	}
	return n
}

// resetLevel starts a fresh round of samples for the level being entered (its estimate stays).
func (s *scheduler) resetLevel(n int) {
	if l := s.levels[n]; l != nil {
		l.samples = 0
	}
}

// dispatch grants slots to the head of the queue while the limit allows. Called with mu held.
func (s *scheduler) dispatch() {
	for s.running < s.limit && len(s.queue) > 0 {
		w := s.queue[0]
		s.queue = s.queue[1:]
		s.running++
		close(w.ready)
	}
	if s.cfg.Changed != nil {
		var bps float64
		if l := s.levels[s.limit]; l != nil {
			bps = l.bytesPerSec
		}
		s.cfg.Changed(s.limit, len(s.queue), bps)
	}
}

func (s *scheduler) remove(w *slotWaiter) {
	for i, q := range s.queue {
		if q == w {
			s.queue = append(s.queue[:i], s.queue[i+1:]...)
			return
		}
	}
}
