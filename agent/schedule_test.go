package agent

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

// simulateDrain runs n dumps of size bytes through s on a node whose throughput with k dumps at
// once is rate(k), finishing them in grant order, and returns the limit after each completion.
func simulateDrain(t *testing.T, s *scheduler, n int, bytes int64, rate func(k int) float64) []int {
	t.Helper()
	ws := make([]*slotWaiter, n)
	for i := range ws {
		ws[i] = s.enqueue(urgencyEviction)
	}
	var limits []int
	type held struct {
		release func(int64, time.Duration)
		level   int
	}
	var granted []held
	next := 0
	for done := 0; done < n; done++ {
		// Take every slot the scheduler granted so far.
		for ; next < n; next++ {
			select {
			case <-ws[next].ready:
			default:
				goto run
			}
			rel, err := s.acquire(context.Background(), ws[next])
			require.NoError(t, err)
			_, running, _ := s.place(ws[next])
			granted = append(granted, held{rel, running})
		}
	run:
		require.NotEmpty(t, granted, "no dump holds a slot after %d done", done)
		h := granted[0]
		granted = granted[1:]
		k := h.level
		took := time.Duration(float64(bytes) * float64(k) / rate(k) * float64(time.Second))
		h.release(bytes, took)
		limits = append(limits, s.limit)
	}
	return limits
}

// A node whose throughput stops growing after two dumps at once: the scheduler climbs to 2,
// tries 3, finds no gain, and settles at 2.
func TestSchedulerClimbsToTheKnee(t *testing.T) {
	s := newScheduler(schedConfig{Max: 4, Min: 1})
	rates := map[int]float64{1: 300e6, 2: 450e6, 3: 460e6, 4: 470e6}
	limits := simulateDrain(t, s, 16, 256<<20, func(k int) float64 { return rates[k] })
	assert.Equal(t, 2, s.limit, "limits after each dump: %v", limits)
	assert.Contains(t, limits, 3, "it must have tried 3: %v", limits)
	assert.NotContains(t, limits, 4, "no gain at 3, so never 4: %v", limits)
	// The next drain starts from what was learnt: it stays at 2.
	limits = simulateDrain(t, s, 8, 256<<20, func(k int) float64 { return rates[k] })
	for _, l := range limits {
		assert.Equal(t, 2, l, "second drain: %v", limits)
	}
}

// A node whose throughput keeps growing (many cores, a volume that wants parallel writes) is
// driven up to --max-concurrent-dumps and no further.
func TestSchedulerClimbsToMax(t *testing.T) {
	s := newScheduler(schedConfig{Max: 4, Min: 1})
	limits := simulateDrain(t, s, 16, 256<<20, func(k int) float64 { return float64(k) * 200e6 })
	assert.Equal(t, 4, s.limit, "%v", limits)
}

// A node where two dumps at once are slower than one (a saturated volume) goes back to one.
func TestSchedulerBacksOff(t *testing.T) {
	s := newScheduler(schedConfig{Max: 4, Min: 1})
	limits := simulateDrain(t, s, 12, 256<<20, func(k int) float64 { return 400e6 / float64(k) })
	assert.Equal(t, 1, s.limit, "%v", limits)
}

// Min == Max is a fixed limit.
func TestSchedulerFixed(t *testing.T) {
	s := newScheduler(schedConfig{Max: 2, Min: 2})
	limits := simulateDrain(t, s, 8, 256<<20, func(k int) float64 { return float64(k) * 200e6 })
	for _, l := range limits {
		assert.Equal(t, 2, l)
	}
}

// Estimates are forgotten after a while: a later drain probes again.
func TestSchedulerForgets(t *testing.T) {
	now := time.Unix(1e9, 0)
	s := newScheduler(schedConfig{Max: 4, Min: 1, Now: func() time.Time { return now }})
	rates := map[int]float64{1: 300e6, 2: 450e6, 3: 460e6, 4: 470e6}
	simulateDrain(t, s, 16, 256<<20, func(k int) float64 { return rates[k] })
	require.Equal(t, 2, s.limit)
	now = now.Add(forgetAfter + time.Minute)
	rates[3] = 900e6 // the volume got faster with more writers
	limits := simulateDrain(t, s, 16, 256<<20, func(k int) float64 { return rates[k] })
	assert.Contains(t, limits, 3, "%v", limits)
}

// Waiting dumps learn their place; a cancelled one leaves the queue, and the ones behind move up.
func TestSchedulerPlace(t *testing.T) {
	s := newScheduler(schedConfig{Max: 1, Min: 1})
	w0, w1, w2 := s.enqueue(urgencyEviction), s.enqueue(urgencyEviction), s.enqueue(urgencyEviction)
	rel, err := s.acquire(context.Background(), w0)
	require.NoError(t, err)
	ahead, running, limit := s.place(w2)
	assert.Equal(t, []int{2, 1, 1}, []int{ahead, running, limit})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = s.acquire(ctx, w1)
	require.Error(t, err)
	ahead, _, _ = s.place(w2)
	assert.Equal(t, 1, ahead)
	rel(1, time.Second)
	rel2, err := s.acquire(context.Background(), w2)
	require.NoError(t, err)
	ahead, running, _ = s.place(w2)
	assert.Equal(t, -1, ahead, "holding a slot")
	assert.Equal(t, 1, running)
	rel2(1, time.Second)
}

// Dumps one at a time with nothing waiting (periodic checkpoints, single evictions) say nothing
// about the node's capacity: the limit stays where it is.
func TestSchedulerLoneDumpsDoNotMoveTheLimit(t *testing.T) {
	s := newScheduler(schedConfig{Max: 4, Min: 1})
	for i := 0; i < 5; i++ {
		w := s.enqueue(urgencyEviction)
		rel, err := s.acquire(context.Background(), w)
		require.NoError(t, err)
		rel(256<<20, time.Second)
	}
	assert.Equal(t, 1, s.limit)
	assert.Empty(t, s.levels)
}

// A termination (its grace period runs) goes before evictions and periodic checkpoints waiting,
// an eviction before periodic ones; the same urgency keeps its arrival order. An eviction that
// gets SIGTERM while it waits moves up with the terminations.
func TestSchedulerUrgency(t *testing.T) {
	s := newScheduler(schedConfig{Max: 1, Min: 1})
	running := s.enqueue(urgencyPeriodic)
	rel, err := s.acquire(context.Background(), running)
	require.NoError(t, err)
	p1 := s.enqueue(urgencyPeriodic)
	e1 := s.enqueue(urgencyEviction)
	e2 := s.enqueue(urgencyEviction)
	t1 := s.enqueue(urgencyTermination)
	p2 := s.enqueue(urgencyPeriodic)
	e3 := s.enqueue(urgencyEviction)
	order := func() []*slotWaiter { return append([]*slotWaiter(nil), s.queue...) }
	require.Equal(t, []*slotWaiter{t1, e1, e2, e3, p1, p2}, order())
	ahead, _, _ := s.place(e1)
	assert.Equal(t, 2, ahead, "the running dump and the termination")

	s.promote(e2, urgencyTermination)
	require.Equal(t, []*slotWaiter{t1, e2, e1, e3, p1, p2}, order())
	s.promote(t1, urgencyEviction) // never lowered
	require.Equal(t, []*slotWaiter{t1, e2, e1, e3, p1, p2}, order())

	var granted []*slotWaiter
	for _, w := range []*slotWaiter{t1, e2, e1, e3, p1, p2} {
		rel(1, time.Second)
		select {
		case <-w.ready:
		case <-time.After(time.Second):
			t.Fatalf("the next slot did not go to waiter %d", len(granted))
		}
		granted = append(granted, w)
		rel, err = s.acquire(context.Background(), w)
		require.NoError(t, err)
	}
	rel(1, time.Second)
	assert.Len(t, granted, 6)
}

func TestDumpUrgency(t *testing.T) {
	assert.Equal(t, urgencyTermination, dumpUrgency(agentapi.CheckpointRequest{Reason: ReasonTermination}))
	assert.Equal(t, urgencyPeriodic, dumpUrgency(agentapi.CheckpointRequest{LeaveRunning: true, Reason: "periodic"}))
	assert.Equal(t, urgencyEviction, dumpUrgency(agentapi.CheckpointRequest{Reason: "eviction"}))
}
