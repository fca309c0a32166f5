package reconcile

import "slices"

// Plan is what a sync must do to make the kernel match the desired state.
type Plan[V any] struct {
	Create []V // wanted, on a free key
	Update []V // wanted, on a key where loom's own object differs
	Delete []V // owned, on a key nothing wants

	// Conflicts are wanted keys held by a foreign object that differs from
	// what loom wants. They are not applied.
	Conflicts []Conflict[V]
	// Duplicates are desired objects dropped because an earlier one had
	// the same key.
	Duplicates []V
}

// Conflict is a wanted object whose key a foreign object holds.
type Conflict[V any] struct {
	Want V
	Have V
}

// State is a desired state indexed by key. It is built once for each change
// of what a backend wants and then read by any number of syncs: a full one
// walks every object in order, a partial one looks up only the keys it was
// given. A State is never changed after NewState, so syncs and watchers may
// read it concurrently. The nil *State is the empty state.
type State[K comparable, V any] struct {
	objs []V       // as given to NewState
	key  func(V) K // the key of an object
	pos  map[K]int // key → index in objs of its first object
	dup  []bool    // dup[i]: objs[i] has the key of an earlier one; nil when none has
	dups []V       // those objects
}

// NewState indexes objs by key; objs must not change afterwards. Of several
// objects with one key the first is kept; the others are reported as
// Duplicates by a full diff.
func NewState[K comparable, V any](key func(V) K, objs []V) *State[K, V] {
	s := &State[K, V]{objs: objs, key: key, pos: make(map[K]int, len(objs))}
	for i, o := range objs {
		k := key(o)
		if _, dup := s.pos[k]; dup {
			if s.dup == nil {
				s.dup = make([]bool, len(objs))
			}
			s.dup[i] = true
			s.dups = append(s.dups, o)
			continue
		}
		s.pos[k] = i
	}
	return s
}

// Has reports whether k is wanted.
func (s *State[K, V]) Has(k K) bool {
	if s == nil {
		return false
	}
	_, ok := s.pos[k]
	return ok
}

// Get returns the object wanted at k.
func (s *State[K, V]) Get(k K) (V, bool) {
	if s == nil {
		var zero V
		return zero, false
	}
	i, ok := s.pos[k]
	if !ok {
		var zero V
		return zero, false
	}
	return s.objs[i], true
}

// Len is the number of keys wanted.
func (s *State[K, V]) Len() int {
	if s == nil {
		return 0
	}
	return len(s.pos)
}

// Diff compares the desired objects with the kernel's owned and foreign ones
// and returns the changes, restricted to keys for which scope returns true
// (nil scope: every key). It is pure: the output follows the order of its
// inputs, so equal inputs give equal plans.
//
// Rules: a wanted key that loom owns is updated when its object differs; a
// wanted key held by a foreign object is a conflict unless that object
// already equals the wanted one; a free wanted key is created; an owned key
// nothing wants is deleted. Foreign objects are never in Update or Delete.
func Diff[K comparable, V any](c Comparer[K, V], desired, owned, foreign []V, scope func(K) bool) Plan[V] {
	want := NewState(c.Key, desired)
	in := func(k K) bool { return scope == nil || scope(k) }
	p := diff(c, want, owned, foreign, in, nil, len(owned))
	p.Duplicates = want.dups
	return p
}

// DiffState is Diff for a desired state indexed beforehand, restricted to
// keys (nil: every key). A partial diff costs O(len(keys)) on the desired
// side, whatever the size of the state, plus one Key per owned object.
// Duplicates are reported by full diffs only.
func DiffState[K comparable, V any](c Comparer[K, V], want *State[K, V], owned, foreign []V, keys map[K]struct{}) Plan[V] {
	if keys == nil {
		p := diff(c, want, owned, foreign, func(K) bool { return true }, nil, len(owned))
		if want != nil {
			p.Duplicates = want.dups
		}
		return p
	}
	// The wanted keys among keys, in the state's order, so equal inputs
	// give equal plans.
	order := make([]int, 0, len(keys))
	if want != nil {
		for k := range keys {
			if i, ok := want.pos[k]; ok {
				order = append(order, i)
			}
		}
	}
	slices.Sort(order)
	return diff(c, want, owned, foreign, func(k K) bool { _, ok := keys[k]; return ok }, order, len(keys))
}

// diff is Diff over the wanted objects at the indexes order (nil: all of
// them), and the owned and foreign ones whose key is in, about size of
// which are expected.
func diff[K comparable, V any](c Comparer[K, V], want *State[K, V], owned, foreign []V, in func(K) bool, order []int, size int) Plan[V] {
	var p Plan[V]
	if want == nil {
		want = &State[K, V]{}
	}
	have := make(map[K]V, size)
	for _, h := range owned {
		k := c.Key(h)
		if !in(k) {
			continue
		}
		if _, dup := have[k]; dup {
			// The kernel keeps one object per key, so this is a second
			// object of ours that the kind's key does not tell apart (an
			// IPv4 route differing only in TOS, say): remove it.
			p.Delete = append(p.Delete, h)
			continue
		}
		have[k] = h
		if !want.Has(k) {
			p.Delete = append(p.Delete, h)
		}
	}
	var other map[K]V
	for _, f := range foreign {
		k := c.Key(f)
		if !in(k) {
			continue
		}
		if other == nil {
			other = make(map[K]V)
		}
		if _, seen := other[k]; !seen {
			other[k] = f
		}
	}

	check := func(i int) {
		w := want.objs[i]
		k := want.key(w)
		if h, ok := have[k]; ok {
			if !c.Equal(w, h) {
				p.Update = append(p.Update, w)
			}
			return
		}
		if f, ok := other[k]; ok {
			if !c.Equal(w, f) {
				p.Conflicts = append(p.Conflicts, Conflict[V]{Want: w, Have: f})
			}
			return
		}
		p.Create = append(p.Create, w)
	}
	if order == nil {
		for i, w := range want.objs {
			if (want.dup == nil || !want.dup[i]) && in(want.key(w)) {
				check(i)
			}
		}
	} else {
		for _, i := range order {
			check(i)
		}
	}
	return p
}
