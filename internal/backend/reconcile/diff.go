package reconcile

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
	in := func(k K) bool { return scope == nil || scope(k) }
	var p Plan[V]

	want := make(map[K]V, len(desired))
	wantOrder := make([]K, 0, len(desired))
	for _, w := range desired {
		k := c.Key(w)
		if _, dup := want[k]; dup {
			p.Duplicates = append(p.Duplicates, w)
			continue
		}
		want[k] = w
		wantOrder = append(wantOrder, k)
	}
	have := make(map[K]V, len(owned))
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
		if _, ok := want[k]; !ok {
			p.Delete = append(p.Delete, h)
		}
	}
	other := make(map[K]V, len(foreign))
	for _, f := range foreign {
		k := c.Key(f)
		if _, seen := other[k]; !seen && in(k) {
			other[k] = f
		}
	}

	for _, k := range wantOrder {
		if !in(k) {
			continue
		}
		w := want[k]
		if h, ok := have[k]; ok {
			if !c.Equal(w, h) {
				p.Update = append(p.Update, w)
			}
			continue
		}
		if f, ok := other[k]; ok {
			if !c.Equal(w, f) {
				p.Conflicts = append(p.Conflicts, Conflict[V]{Want: w, Have: f})
			}
			continue
		}
		p.Create = append(p.Create, w)
	}
	return p
}
